"""Consumer state kept apart from the log, and the decisions made on it.

Owns:

- stream groups: ``coordinator`` (membership, assignment, generations),
  ``assignment`` (who gets which partitions), ``offsets`` (committed offsets, crash-safe
  in their own journal), ``lag`` (``GroupView``: the topics a group covers and its lag),
  ``reset`` (offset reset plans and their fenced execution), ``expiry`` (forgetting
  groups without members);
- queue groups, a kind of consumer group: the ``queue`` subpackage (window, journal,
  retry policy, engine);
- ``journal`` (the append-only, snapshot-compacted operation log both stores use) and
  ``errors`` (one root, ``GroupError``; ``streamd.service.errors`` maps each to a gRPC
  status).

Arrows: consumer_groups imports ``segments`` (errors, frame headers, atomic files) and
the shared bottom of ``streamd`` (clock, errors' root, the generated wire types, the
record codec) only. It reaches the broker through ``host.Broker``, a Protocol the
server satisfies with ``streamd.broker.broker.Broker``; it never imports
``streamd.broker``, ``streamd.service``, ``streamd.metrics`` or the SDK. The
servicers (``streamd.service.group_service`` / ``queue_service``) call in; the
metrics scrape reads ``GroupView`` and ``QueueEngine``'s snapshots.
(``tests/unit/test_layers.py`` holds the graph.)
"""
