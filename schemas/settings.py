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

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from .deadletter import DEFAULT_MAX_BYTES, MAX_MAX_BYTES

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
    sasl_mechanism: str | None = Field(None, validate_default=True,
                                       description="sasl.mechanism, e.g. PLAIN, SCRAM-SHA-512 (required with SASL_*)")
    sasl_username: str | None = Field(None, description="sasl.username")
    sasl_password: SecretStr | None = Field(None, description="sasl.password (never shown in logs or errors)")
    ssl_ca_location: str | None = Field(None, description="ssl.ca.location (CA bundle path)")
    ssl_certificate_location: str | None = Field(None, description="ssl.certificate.location (client cert)")
    ssl_key_location: str | None = Field(None, description="ssl.key.location (client key)")
    extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="any other librdkafka options, as JSON: '{\"client.rack\": \"a\"}' "
        "(not security.protocol, sasl.* or ssl.*: use the settings above)")
    dead_letter_max_bytes: int = Field(
        DEFAULT_MAX_BYTES, ge=0, le=MAX_MAX_BYTES,
        description="bytes of a bad message's value kept in its dead letter (size and SHA-256 are always kept)")

    @field_validator("bootstrap")
    @classmethod
    def _hostports(cls, v: str) -> str:
        for hp in v.split(","):
            if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", hp.strip()):
                raise ValueError(f"{hp!r} is not host:port")
        return v

    @field_validator("sasl_mechanism")
    @classmethod
    def _mechanism(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and str(info.data.get("security_protocol", "")).startswith("SASL"):
            raise ValueError(f"security protocol {info.data['security_protocol']} needs a SASL mechanism "
                             "(e.g. PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER)")
        return v

    @field_validator("extra")
    @classmethod
    def _no_security_overrides(cls, v: dict) -> dict:
        # Security comes from the typed settings only: a stray JSON key must not downgrade it silently.
        bad = sorted(k for k in v if k == "security.protocol" or k.startswith(("sasl.", "ssl.")))
        if bad:
            raise ValueError(f"may not set {', '.join(bad)}: use LUM_KAFKA_SECURITY_PROTOCOL, LUM_KAFKA_SASL_* "
                             "and LUM_KAFKA_SSL_* instead")
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
        password = self.sasl_password.get_secret_value() if self.sasl_password is not None else None
        for key, value in (("sasl.mechanism", self.sasl_mechanism), ("sasl.username", self.sasl_username),
                           ("sasl.password", password), ("ssl.ca.location", self.ssl_ca_location),
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
        # 16 MB of prefetched messages per consumer (librdkafka's default is 64 MB): a consumer that lags keeps
        # its queue full, so this bounds its memory; 16 MB is ~80k events, far more than a batch needs.
        # LUM_KAFKA_EXTRA may change it; it may not change the group and commit keys below.
        tunable = {"queued.max.messages.kbytes": 16384}
        base = {"group.id": group_id, "enable.auto.commit": False, "auto.offset.reset": "earliest"}
        profile = EMBEDDED_PROFILE if self.profile == "embedded" else {}
        return tunable | self.client_config() | base | profile | overrides

    def aiokafka_security(self) -> dict[str, object]:
        """The same security settings in aiokafka/Faust terms (Faust's ``broker_credentials`` input)."""
        out: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            out |= {"sasl_mechanism": self.sasl_mechanism, "sasl_plain_username": self.sasl_username,
                    "sasl_plain_password": self.sasl_password.get_secret_value() if self.sasl_password else None}
        if self.ssl_ca_location:
            out["ssl_cafile"] = self.ssl_ca_location
        return out


class SettingsError(SystemExit):
    """Raised at start-up for a bad setting; its message names the environment variable."""


def load(cls: type[S], **overrides: object) -> S:
    """Build a settings class, turning validation errors into one readable message per bad setting."""
    prefix = cls.model_config.get("env_prefix", "")
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        lines = []
        for err in e.errors(include_url=False):
            field, rest = (err["loc"][0], err["loc"][1:]) if err["loc"] else ("", ())
            where = f" (key {'.'.join(str(p) for p in rest)})" if rest else ""
            lines.append(f"{_env_name(cls, str(field))}{where}: {err['msg']}" + _shown(cls, str(field), err.get("input")))
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except SourceError as e:  # a value the environment source cannot even parse (malformed JSON)
        field = re.search(r'field "([^"]+)"', str(e))
        name = _env_name(cls, field.group(1)) if field else f"a {prefix}* variable"
        cause = f": {e.__cause__}" if e.__cause__ is not None and field and not _secret(cls, field.group(1)) else ""
        raise SettingsError(f"invalid configuration:\n  {name}: cannot be parsed (expected JSON){cause}") from None


def _env_name(cls: type[BaseSettings], field: str) -> str:
    f = cls.model_fields.get(field)
    alias = f.validation_alias if f is not None else None
    if alias is not None and hasattr(alias, "choices"):
        return str(alias.choices[0])
    return f"{cls.model_config.get('env_prefix', '')}{field.upper()}"


def _secret(cls: type[BaseSettings], field: str) -> bool:
    f = cls.model_fields.get(field)
    return f is not None and "SecretStr" in repr(f.annotation)


def _shown(cls: type[BaseSettings], field: str, value: object) -> str:
    """The offending value for the message, unless it is a secret or a whole mapping (which may hold one)."""
    if value is None or isinstance(value, dict) or _secret(cls, field):
        return ""
    return f" (got {value!r})"


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
