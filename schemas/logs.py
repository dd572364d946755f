"""One quiet console for every ``lum`` command: our INFO lines, library noise only with LUM_LOG_LEVEL=DEBUG.

    from schemas.logs import setup_logging, kafka_logger
    setup_logging()                        # LUM_LOG_LEVEL (default INFO); `lum --log-level` passes its value
    Producer(cfg | {"logger": kafka_logger()})   # librdkafka's log lines through Python logging

- fbgemm-gpu and torchrec log on the *root* logger (``logging.info``: every embedding table's arguments, kilobytes
  each), so a name-based level cannot reach them: a filter on the console handler drops their records below
  WARNING unless the level is DEBUG.
- librdkafka writes its own log to stderr (``FAIL|rdkafka#...: Connection refused``) unless a client is given a
  ``logger``; through ``kafka_logger()`` its lines land in the logger ``librdkafka`` at their syslog level
  (ERR -> ERROR, WARNING, NOTICE/INFO -> INFO, DEBUG), shown from WARNING up (all with DEBUG). librdkafka only
  hands them over when the client is polled, which every lum-stream client does.
"""

from __future__ import annotations

import logging
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose INFO output is noise for an operator (matched on the emitting file's path: they use the root logger).
NOISY_PATHS = ("/fbgemm_gpu/", "/torchrec/", "/torch/distributed/")
KAFKA_LOGGER = "librdkafka"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class LogSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LUM_LOG_", extra="ignore")

    level: str = Field("INFO", description="console log level (DEBUG, INFO, WARNING, ERROR); DEBUG also shows "
                       "librdkafka, fbgemm and torchrec INFO lines")

    @field_validator("level")
    @classmethod
    def _known(cls, v: str) -> str:
        if v.upper() not in LEVELS:
            raise ValueError(f"use one of {', '.join(LEVELS)}")
        return v.upper()


class QuietLibraries(logging.Filter):
    """Drop fbgemm/torchrec records below WARNING (they log on the root logger, by module path only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(p in record.pathname for p in NOISY_PATHS)


def setup_logging(level: str | int | None = None) -> int:
    """Configure the console once per process (idempotent); returns the numeric level in effect."""
    if level is None:
        from .settings import load

        level = load(LogSettings).level
    numeric = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
    if not isinstance(numeric, int) or (not isinstance(level, int) and str(level).upper() not in LEVELS):
        raise SystemExit(f"LUM_LOG_LEVEL: unknown level {level!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_lum", False):
            root.removeHandler(h)
    handler = logging.StreamHandler()
    handler._lum = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    if numeric > logging.DEBUG:
        handler.addFilter(QuietLibraries())
    root.addHandler(handler)
    root.setLevel(numeric)
    # librdkafka: warnings and errors by default; its NOTICE/INFO chatter only when debugging.
    logging.getLogger(KAFKA_LOGGER).setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING)
    for name in ("aiokafka", "faust", "mode"):  # the Faust runtime's INFO is per-partition chatter
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    return numeric


def kafka_logger() -> logging.Logger:
    """The logger to pass as a confluent-kafka client's ``logger`` option."""
    return logging.getLogger(KAFKA_LOGGER)
