"""The embedded broker answers, and the topic registry applies idempotently."""

from schemas.topics import ALL_TOPICS
from streaming.kafka import admin


def test_create_topics_is_idempotent(kafka):
    again = admin.create_topics(kafka)
    assert set(again.values()) == {"exists"}
    listed = {name: parts for name, parts, known in admin.list_topics(kafka) if known}
    assert set(listed) == {kafka.topic(t) for t in ALL_TOPICS}
    assert all(listed[kafka.topic(t)] == t.partitions for t in ALL_TOPICS)


def test_cluster_id_and_group_members(kafka):
    cid = admin.cluster_id(kafka)
    assert cid and cid == admin.cluster_id(kafka)
    assert admin.group_members(kafka, kafka.topic_prefix + "nobody-here") == []
