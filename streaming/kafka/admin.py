"""Topics and cluster facts: ``lum topics create|list|describe``, the cluster id, a group's live members.

``create_topics`` applies the topic registry (``schemas.topics``) idempotently: existing topics are left
alone (and reported), missing ones are created with the registry's partitions, cleanup policy and retention.
The embedded broker accepts but ignores compaction and retention; Apache Kafka enforces them.
No other module builds a confluent-kafka ``AdminClient``.
"""

from __future__ import annotations

import socket
import time

from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from schemas.logs import kafka_logger
from schemas.settings import KafkaSettings
from schemas.topics import ALL_TOPICS, Topic


def _admin(settings: KafkaSettings) -> AdminClient:
    return AdminClient(settings.client_config())


def wait_ready(bootstrap: str, timeout: float = 30.0, alive=lambda: True) -> None:
    """Block until a broker at ``bootstrap`` (plaintext) answers a metadata request; TimeoutError if not.
    ``alive()`` returning False (the broker process died) stops the wait with RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"broker at {bootstrap} exited while starting")
        try:
            # A plain TCP connect first: a Kafka client started before the port listens logs librdkafka's
            # "FAIL ... Connection refused" to stderr, the first line a user would see.
            host, _, port = bootstrap.split(",")[0].rpartition(":")
            socket.create_connection((host, int(port)), timeout=1).close()
            AdminClient({"bootstrap.servers": bootstrap, "logger": kafka_logger()}).list_topics(timeout=2)
            return
        except Exception:  # not up yet
            time.sleep(0.1)
    raise TimeoutError(f"no broker answered on {bootstrap} within {timeout:.0f}s")


def create_topics(settings: KafkaSettings, topics: tuple[Topic, ...] = ALL_TOPICS, replication: int = 1,
                  partitions: int | None = None, timeout: float = 30) -> dict[str, str]:
    """Create the missing topics; returns {name: "created" | "exists"}."""
    admin = _admin(settings)
    existing = set(admin.list_topics(timeout=timeout).topics)
    result: dict[str, str] = {}
    new = []
    for t in topics:
        name = settings.topic(t)
        if name in existing:
            result[name] = "exists"
        else:
            new.append(NewTopic(name, num_partitions=partitions or t.partitions, replication_factor=replication,
                                config=t.kafka_config()))
    result |= _create(admin, new, timeout)
    return result


def _create(admin: AdminClient, new: list[NewTopic], timeout: float) -> dict[str, str]:
    result = {}
    for name, fut in (admin.create_topics(new, request_timeout=timeout).items() if new else []):
        try:
            fut.result(timeout)
            result[name] = "created"
        except Exception as e:  # a concurrent creator won the race: still fine
            if "TOPIC_ALREADY_EXISTS" in str(e) or "already exists" in str(e).lower():
                result[name] = "exists"
            else:
                raise RuntimeError(f"creating topic {name}: {e}") from e
    return result


def partition_count(settings: KafkaSettings, topic: str, timeout: float = 30) -> int | None:
    """Partitions of ``topic`` (None when it does not exist)."""
    md = _admin(settings).list_topics(timeout=timeout)
    return len(md.topics[topic].partitions) if topic in md.topics else None


def ensure_topic(settings: KafkaSettings, name: str, partitions: int, config: dict[str, str] | None = None,
                 replication: int = 1, timeout: float = 30) -> int:
    """Create ``name`` with ``partitions`` if missing; returns how many partitions it has."""
    admin = _admin(settings)
    md = admin.list_topics(timeout=timeout)
    if name in md.topics:
        return len(md.topics[name].partitions)
    _create(admin, [NewTopic(name, num_partitions=partitions, replication_factor=replication, config=config or {})],
            timeout)
    return partitions


def list_topics(settings: KafkaSettings, timeout: float = 30) -> list[tuple[str, int, bool]]:
    """(name, partitions, known to the registry) for every topic with our prefix."""
    md = _admin(settings).list_topics(timeout=timeout)
    ours = {settings.topic(t) for t in ALL_TOPICS}
    return sorted((n, len(t.partitions), n in ours) for n, t in md.topics.items()
                  if n.startswith(settings.topic_prefix) and not n.startswith("__"))


def describe(settings: KafkaSettings, timeout: float = 30) -> list[dict]:
    admin = _admin(settings)
    md = admin.list_topics(timeout=timeout)
    rows = []
    for t in ALL_TOPICS:
        name = settings.topic(t)
        row = {"topic": name, "key": t.key, "value": t.value.__name__, "registry_partitions": t.partitions,
               "registry_config": t.kafka_config(), "doc": t.doc}
        if name in md.topics:
            row["partitions"] = len(md.topics[name].partitions)
            try:
                res = ConfigResource(ConfigResource.Type.TOPIC, name)
                cfg = admin.describe_configs([res])[res].result(timeout)
                row["cluster_config"] = {k: cfg[k].value for k in t.kafka_config() if k in cfg}
            except Exception as e:  # some brokers do not implement DescribeConfigs
                row["cluster_config"] = f"unavailable: {e}"
        else:
            row["partitions"] = "missing"
        rows.append(row)
    return rows


def cluster_id(settings: KafkaSettings, timeout: float = 30) -> str:
    """The cluster's id (what local state records, so that state from another cluster is not trusted)."""
    cid = _admin(settings).list_topics(timeout=timeout).cluster_id
    if not cid:
        raise RuntimeError(f"the cluster at {settings.bootstrap} reported no cluster id")
    return cid


_IDLE_STATES = {"EMPTY", "DEAD", "UNKNOWN"}


def group_members(settings: KafkaSettings, group: str, timeout: float = 30) -> list[str]:
    """Live members of consumer group ``group`` as "client_id@host (member_id)"; [] when nobody is in it.

    A group in an active state (stable, rebalancing) whose broker lists no members (the embedded broker
    never does) counts as having one unnamed member: the safe answer for a caller that must not race it.
    """
    admin = _admin(settings)  # held while the future runs: a destroyed client never completes it
    desc = admin.describe_consumer_groups([group], request_timeout=timeout)[group].result(timeout)
    members = [f"{m.client_id}@{m.host} ({m.member_id})" for m in desc.members]
    state = getattr(desc.state, "name", str(desc.state)).upper()
    if not members and state not in _IDLE_STATES:
        members = [f"unnamed member(s): the group is {state} but the broker does not list its members"]
    return members
