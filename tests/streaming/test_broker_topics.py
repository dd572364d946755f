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


def test_free_ports_stay_below_the_ephemeral_range():
    """A port a client polls before its server listens must not be one the kernel can hand out as a source
    port: a self-connect there reads back its own request and briefly holds the port the server binds."""
    from pathlib import Path

    from streaming.broker import free_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(p + 15 < low for p in (free_port() for _ in range(50)))
