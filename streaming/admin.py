"""Apply the topic registry (``schemas.topics``) to a cluster: ``lum topics create|list|describe``.

``create`` is idempotent: existing topics are left alone (and reported), missing ones are created with the
registry's partitions, cleanup policy and retention. The embedded broker accepts but ignores compaction and
retention (README, Limits); Apache Kafka enforces them.
"""

from __future__ import annotations

from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from schemas.settings import KafkaSettings
from schemas.topics import ALL_TOPICS, Topic


def _admin(settings: KafkaSettings) -> AdminClient:
    return AdminClient(settings.client_config())


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
