"""Runtime-neutral pieces shared by the runtimes that host agent logic: the logic registry and crash injection.

    make_logic("sequences", cfg)      # the pure logic of an agent, from its settings
    crash = Crash.from_settings(cfg)  # test-only crash injection: crash("after_state_write")

Crash injection (TEST ONLY). ``LUM_AGENT_CRASH_AT=name[:n]`` kills the process with SIGKILL (no clean-up of
any kind, like a power cut) the n-th time (default 1st) it reaches the named point. It fires once per data
directory (a marker file there records it), so a restarted worker (``lum agents`` restarts dead workers)
runs on. The points, in the order a batch reaches them:

    assign              inside the partition-assignment callback, after the stores are opened
    mid_produce         while sending the batch's outputs (the n-th send)
    after_state_write   after the batch's state commit (state + positions written, outputs not delivered)
    after_flush         after the outputs were delivered, before anything else
    before_commit       right before the consumer-group offset commit
    revoke              inside the partition-revocation callback
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

CRASH_POINTS = ("assign", "mid_produce", "after_state_write", "after_flush", "before_commit", "revoke")


class Crash:
    """Call ``crash(point)`` at each named point; it does nothing unless the setting names that point."""

    def __init__(self, spec: str = "", marker_dir: Path | None = None):
        self.point, self.nth, self.seen = "", 0, 0
        self.marker = None
        if spec:
            point, _, nth = spec.partition(":")
            if point not in CRASH_POINTS:
                raise ValueError(f"LUM_AGENT_CRASH_AT: unknown point {point!r}; known: {', '.join(CRASH_POINTS)}")
            self.point, self.nth = point, int(nth or 1)
            self.marker = (marker_dir or Path(".")) / f".crashed-{point}-{self.nth}"
            if self.marker.exists():
                self.point = ""  # already fired for this data directory

    @classmethod
    def from_settings(cls, cfg) -> Crash:
        return cls(cfg.crash_at, Path(cfg.data_dir))

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        self.seen += 1
        if self.seen >= self.nth:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"pid {os.getpid()}\n")
            log.critical("LUM_AGENT_CRASH_AT=%s:%d: killing this process (test crash injection)", point, self.nth)
            for h in logging.getLogger().handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def make_logic(agent: str, cfg):
    """The pure logic of ``agent`` configured from ``AgentSettings``."""
    if agent == "sequences":
        from .sequences import SequenceLogic

        return SequenceLogic.from_settings(cfg)
    raise ValueError(f"unknown agent {agent!r}")
