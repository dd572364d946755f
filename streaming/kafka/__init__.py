"""The one Kafka client layer of lum-stream: every producer, consumer and admin client is built here.

    from streaming.kafka import Output, DeliveryError, DeadLetters, group_consumer, reader, read_to_end, snapshot

* ``producer``: ``Output``, whose ``flush`` raises ``DeliveryError`` when anything was not delivered and
  whose ``produce`` raises it (naming topic and size) when librdkafka refuses a message outright.
* ``reader``: read a topic to its end without a group (``reader``, ``read_to_end``, ``partitions_of``),
  the last value per key (``snapshot``), and ``group_consumer`` for the agents' and trainers' groups.
* ``admin``: topics from the registry, ``cluster_id``, ``group_members``.
* ``deadletters``: ``DeadLetters``, the bounded dead-letter sender.

``trainers/`` may import this package (and nothing else of ``streaming/``). What is delivered how often
(producer, consumers, dead letters, timestamps) is stated in the README's "Delivery guarantees".
"""

from .admin import cluster_id, create_topics, group_members
from .deadletters import DeadLetters
from .producer import DeliveryError, Output
from .reader import group_consumer, partitions_of, read_to_end, reader, snapshot

__all__ = ["DeadLetters", "DeliveryError", "Output", "cluster_id", "create_topics", "group_consumer",
           "group_members", "partitions_of", "read_to_end", "reader", "snapshot"]
