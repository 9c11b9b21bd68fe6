"""``python -m streamd`` is the ``streamd`` command."""

from streamd.cli.main import main

raise SystemExit(main())
