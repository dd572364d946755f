"""Settings of the streaming agents (``lum agents``, ``lum backfill sequences``), from the environment.

Prefix ``LUM_AGENT_`` (``LUM_AGENT_MAX_PAIRS=512``); two settings also answer to the project-wide names
``LUM_DATA_DIR`` (state directory) and ``LUM_JOIN_WINDOW_MS`` (attribution window). Build with
``schemas.settings.load(AgentSettings)`` so a bad value stops start-up with the variable's name.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LUM_AGENT_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(Path("./state"), validation_alias=AliasChoices("LUM_DATA_DIR", "LUM_AGENT_DATA_DIR", "data_dir"),
                           description="local state (one RocksDB per agent and partition)")
    max_pairs: int = Field(1024, ge=1, le=100_000, description="sequence cap: the oldest pairs beyond it are dropped")
    batch_size: int = Field(2000, ge=1, le=100_000, description="messages per batch: one RocksDB write per batch")
    batch_wait_ms: int = Field(200, ge=1, le=60_000, description="longest wait to fill a batch (latency bound)")
    sequences_group: str = Field("lum-sequences", min_length=1, description="consumer group of the sequence agent")
    joiner_group: str = Field("lum-joiner", min_length=1, description="consumer group of the joiner")
    join_window_ms: int = Field(30 * 60_000, ge=1, validation_alias=AliasChoices(
        "LUM_JOIN_WINDOW_MS", "LUM_AGENT_JOIN_WINDOW_MS", "join_window_ms"),
        description="attribution window after an impression (event time); $LUM_JOIN_WINDOW_MS")
    allowed_lateness_ms: int = Field(60_000, ge=0, description="joiner watermark = event time reached by its inputs minus this")
    join_retention_ms: int = Field(24 * 3600_000, ge=0,
                                   description="how long closed windows are remembered (duplicates, late clicks)")
    max_watermark_step_ms: int = Field(3_600_000, ge=1, description="joiner: how far an isolated jump in event "
                                       "time moves the watermark per batch (dense data moves it freely)")
    join_state_horizon_ms: int = Field(30 * 24 * 3600_000, ge=1, description="joiner: users idle this long "
                                       "(event time) lose their history and LUM features")
    joiner_changelog: bool = Field(True, description="joiner: write the joiner-changelog topic and rebuild "
                                   "state from it on a worker without the partition's data")
    history_len: int = Field(50, ge=0, le=256, description="items of point-in-time history per training example")
    max_future_skew_ms: int = Field(3_600_000, ge=0,
                                    description="events later than now + this are dead-lettered (clock skew allowed)")
    flush_timeout_s: float = Field(60.0, gt=0, description="longest wait for a batch's outputs to be delivered; "
                                   "past it the worker stops without committing the batch")
    restart_backoff_s: float = Field(1.0, gt=0, description="lum agents: first wait before restarting a dead worker "
                                     "(doubles per quick failure)")
    restart_backoff_max_s: float = Field(60.0, gt=0, description="lum agents: longest wait between restarts")
    crash_at: str = Field("", pattern=r"^([a-z_]+(:[0-9]+)?)?$",
                          description="TEST ONLY: kill the worker (SIGKILL) the n-th time it reaches the named "
                          "point (name[:n]; once per data directory); see streaming.agents.runtime.CRASH_POINTS")
    rocksdb_memory_mb: int = Field(16, ge=4, le=1 << 20, description="RocksDB memory of one worker process, all its "
                                   "stores together: one block cache holding data, index and filter blocks and "
                                   "the memtables' charge")
    rocksdb_write_buffer_mb: int = Field(4, ge=1, le=1 << 20, description="memtables of one worker's stores "
                                         "together, charged to LUM_AGENT_ROCKSDB_MEMORY_MB (reaching it triggers "
                                         "a flush; writes never wait); less than that budget")
    log_interval_s: float = Field(10.0, gt=0, description="seconds between throughput/lag log lines")

    @model_validator(mode="after")
    def _write_buffers_fit(self) -> AgentSettings:
        if self.rocksdb_write_buffer_mb >= self.rocksdb_memory_mb:
            raise ValueError(f"LUM_AGENT_ROCKSDB_WRITE_BUFFER_MB ({self.rocksdb_write_buffer_mb}) must be less than "
                             f"LUM_AGENT_ROCKSDB_MEMORY_MB ({self.rocksdb_memory_mb}): the memtables are charged to it")
        return self
