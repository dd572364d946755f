"""Kafka connection settings shared by every lum-stream process, read from the environment.

All settings have the prefix ``LUM_KAFKA_`` (``LUM_KAFKA_BOOTSTRAP=host:9092``); CLI flags such as
``--bootstrap`` override them. The same code talks to the embedded broker (Tansu) and to Apache Kafka: only
the bootstrap address, the security settings and ``LUM_KAFKA_PROFILE`` differ. Client options that only the
embedded broker needs live in ``EMBEDDED_PROFILE`` and nowhere else.
"""

from __future__ import annotations

import json
import re
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .topics import Topic

# Tansu 0.6 differs from Apache Kafka (README, Limits): group joins wait half the session
# timeout, and waiting fetches are not woken by new data. These values are also valid on Apache Kafka.
EMBEDDED_PROFILE: dict[str, object] = {"session.timeout.ms": 6000, "fetch.wait.max.ms": 50}

S = TypeVar("S", bound=BaseSettings)


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LUM_KAFKA_", extra="ignore")

    bootstrap: str = Field("127.0.0.1:9092", description="bootstrap servers, host:port[,host:port...]")
    profile: Literal["embedded", "kafka"] = Field(
        "embedded", description="'embedded' adds the client options the Tansu broker needs; 'kafka' for Apache Kafka")
    topic_prefix: str = Field("", description="prefix for every topic name, to share one cluster")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="security.protocol")
    sasl_mechanism: str | None = Field(None, description="sasl.mechanism, e.g. PLAIN, SCRAM-SHA-512")
    sasl_username: str | None = Field(None, description="sasl.username")
    sasl_password: str | None = Field(None, description="sasl.password")
    ssl_ca_location: str | None = Field(None, description="ssl.ca.location (CA bundle path)")
    ssl_certificate_location: str | None = Field(None, description="ssl.certificate.location (client cert)")
    ssl_key_location: str | None = Field(None, description="ssl.key.location (client key)")
    extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="any other librdkafka options, as JSON: '{\"client.rack\": \"a\"}'")

    @field_validator("bootstrap")
    @classmethod
    def _hostports(cls, v: str) -> str:
        for hp in v.split(","):
            if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", hp.strip()):
                raise ValueError(f"{hp!r} is not host:port")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (at most 100)")
        return v

    def topic(self, topic: Topic) -> str:
        return self.topic_prefix + topic.name

    def client_config(self) -> dict[str, object]:
        """librdkafka options common to producers, consumers and admin clients."""
        from .logs import kafka_logger  # librdkafka's log through Python logging, not raw to stderr

        cfg: dict[str, object] = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol,
                                  "logger": kafka_logger()}
        for key, value in (("sasl.mechanism", self.sasl_mechanism), ("sasl.username", self.sasl_username),
                           ("sasl.password", self.sasl_password), ("ssl.ca.location", self.ssl_ca_location),
                           ("ssl.certificate.location", self.ssl_certificate_location),
                           ("ssl.key.location", self.ssl_key_location)):
            if value is not None:
                cfg[key] = value
        return cfg | dict(self.extra)

    def producer_config(self, **overrides: object) -> dict[str, object]:
        # Idempotent, batched, lz4: retries never duplicate and throughput stays high.
        return self.client_config() | {"enable.idempotence": True, "linger.ms": 20, "batch.num.messages": 10000,
                                       "compression.type": "lz4"} | overrides

    def consumer_config(self, group_id: str, **overrides: object) -> dict[str, object]:
        base = {"group.id": group_id, "enable.auto.commit": False, "auto.offset.reset": "earliest"}
        profile = EMBEDDED_PROFILE if self.profile == "embedded" else {}
        return self.client_config() | base | profile | overrides

    def aiokafka_security(self) -> dict[str, object]:
        """The same security settings in aiokafka/Faust terms (Faust's ``broker_credentials`` input)."""
        out: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            out |= {"sasl_mechanism": self.sasl_mechanism, "sasl_plain_username": self.sasl_username,
                    "sasl_plain_password": self.sasl_password}
        if self.ssl_ca_location:
            out["ssl_cafile"] = self.ssl_ca_location
        return out


class SettingsError(SystemExit):
    """Raised at start-up for a bad setting; its message names the environment variable."""


def load(cls: type[S], **overrides: object) -> S:
    """Build a settings class, turning validation errors into one readable message per bad setting."""
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        prefix = cls.model_config.get("env_prefix", "")
        lines = [f"{prefix}{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                 + (f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else "")
                 for err in e.errors(include_url=False)]
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def settings_help(cls: type[BaseSettings]) -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting of a class (README, ``lum config``)."""
    prefix = cls.model_config.get("env_prefix", "")
    rows = []
    for name, f in cls.model_fields.items():
        env = f"{prefix}{name.upper()}"
        alias = f.validation_alias
        if alias is not None and hasattr(alias, "choices"):  # AliasChoices: the first is the documented name
            env = str(alias.choices[0])
        default = f.get_default(call_default_factory=True)
        shown = default if isinstance(default, str) else json.dumps(default, default=str)
        rows.append((env, shown, f.description or ""))
    return rows
