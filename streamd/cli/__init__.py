"""The ``streamd`` command line: a thin client over streamd.client (and ``serve``)."""
