"""Queue groups: competing consumers with leases over a topic's partitions, a kind of
consumer group (the shape of Kafka's share groups).

Modules, bottom to top:

- ``retry``: ``RetryPolicy``, exponential backoff with jitter;
- ``window``: ``PartitionQueue``, one partition's state (pure logic, time passed in):
  the window of in-flight records, their states, leases, delivery counts;
- ``stats``: ``PartitionStats``, the public per-partition snapshot (describe, metrics);
- ``store``: ``QueueStore``, every group's state crash-safe in ``queues.journal``;
- ``engine``: ``QueueEngine``, the groups on the broker's topics: admission from the
  log, receive, settle, timers, dead letters, seek.

Arrows: ``engine`` -> ``store`` -> ``window`` -> ``retry``; ``engine`` reaches the
broker only through ``consumer_groups.host.Broker`` (handed in by the server) and
decodes records with the shared ``streamd.codec``. ``streamd.service.queue_service``
(validate -> call the engine -> encode) and ``streamd.metrics`` call in; nothing here
imports them.
"""
