"""Queue groups: competing consumers with leases, a kind of consumer group.

``window`` (one partition's state), ``store`` (the journal), ``retry`` (backoff) and
``engine`` (the groups on the broker's topics).
"""
