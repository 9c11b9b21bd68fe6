"""Typed errors of the consumer-group layer.

Each carries structured fields and a stable ``reason``; ``streamd.service.errors``
maps every class to a gRPC status code.

    GroupError
    ├── InvalidGroupRequest   a field out of its domain            INVALID_ARGUMENT
    ├── GroupNotFound         no members and no committed offsets  NOT_FOUND
    ├── GroupNotEmpty         the operation needs a group with no members
    │                                                              FAILED_PRECONDITION
    ├── UnknownMember         member id not in the group (left, removed, fenced)
    │                                                              ABORTED
    ├── MemberFenced          the member was removed (session or rebalance timeout,
    │                         or replaced by a static member)     ABORTED
    ├── InstanceFenced        a newer member took over the static instance id:
    │                         this one must not rejoin            ABORTED
    ├── StaleGeneration       commit for a partition the member does not own in
    │                         the generation it names              ABORTED
    ├── NothingToUndo         no earlier reset to undo             FAILED_PRECONDITION
    ├── GroupLimitExceeded    too many groups or members           RESOURCE_EXHAUSTED
    ├── QueueGroupNotFound    no such queue group on the topic     NOT_FOUND
    ├── QueueGroupExists                                           ALREADY_EXISTS
    └── LeaseExpired          the lease is expired, settled or another worker's
                                                                   FAILED_PRECONDITION
"""

from __future__ import annotations

from streamd.errors import StructuredError


class GroupError(StructuredError):
    reason = "GROUP_ERROR"


class InvalidGroupRequest(GroupError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, *, reason: str | None = None) -> None:
        super().__init__(f"{field}: {message}", field=field)
        if reason is not None:
            self.reason = reason


class GroupNotFound(GroupError):
    reason = "GROUP_NOT_FOUND"

    def __init__(self, group: str) -> None:
        super().__init__(f"group {group!r} does not exist", group=group)


class GroupNotEmpty(GroupError):
    reason = "GROUP_NOT_EMPTY"

    def __init__(self, group: str, members: int, what: str) -> None:
        super().__init__(f"group {group!r} has {members} live member(s); {what}", group=group, members=members)


class UnknownMember(GroupError):
    reason = "UNKNOWN_MEMBER"

    def __init__(self, group: str, member_id: str) -> None:
        super().__init__(
            f"member {member_id!r} is not in group {group!r} (it left, timed out or was fenced); join again",
            group=group,
            member_id=member_id,
        )


class MemberFenced(GroupError):
    reason = "MEMBER_FENCED"

    def __init__(self, group: str, member_id: str, why: str) -> None:
        super().__init__(
            f"member {member_id!r} was removed from group {group!r}: {why}; join again",
            group=group,
            member_id=member_id,
        )


class InstanceFenced(GroupError):
    reason = "INSTANCE_FENCED"

    def __init__(self, group: str, member_id: str, instance_id: str) -> None:
        super().__init__(
            f"member {member_id!r} of group {group!r} was replaced by a newer member with instance id "
            f"{instance_id!r}; two processes must not share an instance id",
            group=group,
            member_id=member_id,
            instance_id=instance_id,
        )


class StaleGeneration(GroupError):
    reason = "STALE_GENERATION"

    def __init__(self, group: str, member_id: str, generation: int, topic: str, partition: int, why: str) -> None:
        super().__init__(
            f"commit refused for {topic}/{partition} in group {group!r}: {why}",
            group=group,
            member_id=member_id,
            generation=generation,
            topic=topic,
            partition=partition,
        )


class NothingToUndo(GroupError):
    reason = "NOTHING_TO_UNDO"

    def __init__(self, group: str) -> None:
        super().__init__(f"group {group!r} has no executed reset to undo", group=group)


class GroupLimitExceeded(GroupError):
    reason = "LIMIT_EXCEEDED"

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"too many {what} (limit {limit})", limit=limit)


class QueueGroupNotFound(GroupError):
    reason = "QUEUE_GROUP_NOT_FOUND"

    def __init__(self, group: str, topic: str) -> None:
        super().__init__(f"queue group {group!r} on topic {topic!r} does not exist", group=group, topic=topic)


class QueueGroupExists(GroupError):
    reason = "QUEUE_GROUP_EXISTS"

    def __init__(self, group: str, topic: str) -> None:
        super().__init__(f"queue group {group!r} on topic {topic!r} already exists", group=group, topic=topic)


class LeaseExpired(GroupError):
    reason = "LEASE_EXPIRED"

    def __init__(self, partition: int, offset: int, why: str) -> None:
        super().__init__(f"lease on partition {partition} offset {offset}: {why}", partition=partition, offset=offset)
        self.partition, self.offset = partition, offset
