"""Consumer state kept apart from the log: committed offsets of stream groups and
queue groups' leases and acks. Arrives with the consumer-groups milestone; it reads
records only through ``segments.PartitionLog``'s public API."""
