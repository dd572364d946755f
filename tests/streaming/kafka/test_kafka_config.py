"""Kafka client settings: bad values fail at start-up naming the setting, secrets never show, security keys
come only from the typed settings."""

import pytest

from schemas.settings import KafkaSettings, SettingsError, load

PASSWORD = "s3cr3t-hunter2"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("LUM_KAFKA_EXTRA", "LUM_KAFKA_SECURITY_PROTOCOL", "LUM_KAFKA_SASL_MECHANISM", "LUM_KAFKA_SASL_PASSWORD",
                 "LUM_KAFKA_SASL_USERNAME", "LUM_KAFKA_DEAD_LETTER_MAX_BYTES"):
        monkeypatch.delenv(name, raising=False)


def _error(monkeypatch, **env) -> str:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as e:
        load(KafkaSettings)
    return str(e.value)


def test_malformed_extra_names_the_setting(monkeypatch):
    msg = _error(monkeypatch, LUM_KAFKA_EXTRA="{client.rack: a")
    assert "LUM_KAFKA_EXTRA" in msg and "JSON" in msg


def test_extra_may_not_override_security_keys(monkeypatch):
    for key in ("security.protocol", "sasl.mechanism", "sasl.password", "ssl.ca.location"):
        msg = _error(monkeypatch, LUM_KAFKA_EXTRA=f'{{"{key}": "x"}}')
        assert "LUM_KAFKA_EXTRA" in msg and key in msg
    monkeypatch.setenv("LUM_KAFKA_EXTRA", '{"client.rack": "a"}')
    assert load(KafkaSettings).client_config()["client.rack"] == "a"


def test_sasl_without_mechanism_is_rejected_naming_the_setting(monkeypatch):
    msg = _error(monkeypatch, LUM_KAFKA_SECURITY_PROTOCOL="SASL_SSL", LUM_KAFKA_SASL_USERNAME="u",
                 LUM_KAFKA_SASL_PASSWORD=PASSWORD)
    assert "LUM_KAFKA_SASL_MECHANISM" in msg and PASSWORD not in msg


def test_password_is_secret_in_reprs_and_errors_but_reaches_the_client(monkeypatch):
    monkeypatch.setenv("LUM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("LUM_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("LUM_KAFKA_SASL_PASSWORD", PASSWORD)
    s = load(KafkaSettings)
    assert PASSWORD not in repr(s) and PASSWORD not in str(s) and PASSWORD not in s.model_dump_json()
    assert s.client_config()["sasl.password"] == PASSWORD
    assert s.aiokafka_security()["sasl_plain_password"] == PASSWORD
    # Another setting is wrong: the message names it and never echoes the password.
    msg = _error(monkeypatch, LUM_KAFKA_BOOTSTRAP="nope")
    assert "LUM_KAFKA_BOOTSTRAP" in msg and PASSWORD not in msg


def test_dead_letter_limit_is_bounded(monkeypatch):
    assert load(KafkaSettings).dead_letter_max_bytes == 64 * 1024
    assert "LUM_KAFKA_DEAD_LETTER_MAX_BYTES" in _error(monkeypatch, LUM_KAFKA_DEAD_LETTER_MAX_BYTES="5000000")


def test_consumer_prefetch_is_bounded_and_tunable_but_commit_keys_are_not(monkeypatch):
    """A lagging consumer fills its prefetch queue: it is bounded (16 MB, not librdkafka's 64 MB) so an agent's
    memory stays flat; LUM_KAFKA_EXTRA may change it, never the group/commit keys that offsets depend on."""
    assert load(KafkaSettings).consumer_config("g")["queued.max.messages.kbytes"] == 16384
    monkeypatch.setenv("LUM_KAFKA_EXTRA", '{"queued.max.messages.kbytes": 4096, "enable.auto.commit": true}')
    cfg = load(KafkaSettings).consumer_config("g")
    assert cfg["queued.max.messages.kbytes"] == 4096 and cfg["enable.auto.commit"] is False
