"""lum-stream's contracts: event models, (condition, item) tokenization, topic registry, codec, settings.

Depends on pydantic, pydantic-settings and the standard library only. ``streaming`` and ``trainers`` both
import this package and never each other: they meet only through the topics defined here.
"""

from .codec import DecodeError, decode, encode
from .events import (BEHAVIORS as BEHAVIOR_TYPES, BehaviorEvent, ConditionOutput, DeadLetter, ImpressionEvent,
                     ItemEmbedding, LumFeatures, TrainingExample)
from .settings import KafkaSettings, SettingsError, load
from .tokenize import CONDITION_KINDS, TOKENIZER_VERSION, TokenPair, UserSequence, condition_id, parse_condition
from .topics import ALL_TOPICS, BY_NAME, Topic, key_of

__all__ = [
    "ALL_TOPICS", "BEHAVIOR_TYPES", "BY_NAME", "CONDITION_KINDS", "TOKENIZER_VERSION", "BehaviorEvent",
    "ConditionOutput", "DeadLetter", "DecodeError", "ImpressionEvent", "ItemEmbedding", "KafkaSettings",
    "LumFeatures", "SettingsError", "TokenPair", "Topic", "TrainingExample", "UserSequence", "condition_id",
    "decode", "encode", "key_of", "load", "parse_condition",
]
