"""streamd.v1.TopicService: validate, call the Broker, encode."""

from __future__ import annotations

from consumer_groups.queue.engine import QueueEngine
from streamd.broker.broker import Broker, Topic
from streamd.service.group_service import GroupService
from streamd.v1 import streamd_pb2 as pb

from .convert import overrides_from_pb, topic_to_pb


def describe(topic: Topic) -> pb.TopicDescription:
    return topic_to_pb(topic.meta, [p.describe() for p in topic.partitions],
                       [p.damaged() for p in topic.partitions])


class TopicService:
    def __init__(self, broker: Broker, groups: GroupService | None = None, queues: QueueEngine | None = None) -> None:
        self.broker = broker
        self.groups = groups
        self.queues = queues

    async def CreateTopic(self, request: pb.CreateTopicRequest, context) -> pb.CreateTopicResponse:
        topic = self.broker.create_topic(
            request.topic, request.partition_count, overrides_from_pb(request.config)
        )
        if self.groups is not None:
            self.groups.topic_created(topic.meta.name)
        return pb.CreateTopicResponse(topic=describe(topic))

    async def DeleteTopic(self, request: pb.DeleteTopicRequest, context) -> pb.DeleteTopicResponse:
        self.broker.check_serving()
        self.broker.topic(request.topic)
        if self.groups is not None:
            await self.groups.forget_topic(request.topic)
        if self.queues is not None:
            await self.queues.forget_topic(request.topic)
        await self.broker.delete_topic(request.topic)
        if self.groups is not None:
            self.groups.topic_deleted(request.topic)
        return pb.DeleteTopicResponse()

    async def ListTopics(self, request: pb.ListTopicsRequest, context) -> pb.ListTopicsResponse:
        topics = [describe(t) for _, t in sorted(self.broker.topics.items())]
        return pb.ListTopicsResponse(topics=topics)

    async def DescribeTopic(self, request: pb.DescribeTopicRequest, context) -> pb.DescribeTopicResponse:
        return pb.DescribeTopicResponse(topic=describe(self.broker.topic(request.topic)))
