"""``lum agents``: start N worker processes per agent and keep them running.

    lum agents [--workers N] [--only sequences|joiner] [--log-level INFO]   # Ctrl-C / SIGTERM stops every worker
    lum agents --runtime faust [--workers N]                                 # Faust workers of the same logic

Worker i (sequence workers first, then joiner workers) is ``python -m streaming.agents.worker AGENT --index i``
(``python -m streaming.agents.faust_app AGENT --index i`` with ``--runtime faust``).
A worker that dies (a failed batch exits with code 1 and commits nothing for that batch; a kill; a crash)
is restarted after a back-off that starts at ``LUM_AGENT_RESTART_BACKOFF_S`` and doubles while restarts come
quickly (the worker lived less than a minute), up to ``LUM_AGENT_RESTART_BACKOFF_MAX_S``; every exit and
restart is logged with the worker, its exit code and the wait. The restarted worker redoes the failed batch
from the group's committed offsets. SIGTERM/SIGINT stop every worker (SIGTERM, then SIGKILL after 60 s). If the
supervisor itself dies without that (SIGKILL, OOM killer), Linux sends each worker SIGTERM (parent-death
signal), so no worker keeps consuming unsupervised next to the ones a restarted supervisor starts.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
AGENTS = ("sequences", "joiner")
HEALTHY_AFTER_S = 60.0  # a worker that lived this long resets the back-off


@dataclass
class _Slot:
    agent: str
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    codes: list[int] = field(default_factory=list)


def _die_with_parent(parent: int):
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies (a no-op elsewhere)."""

    def arm() -> None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl: the signal would never come
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def supervise(workers: int, only: str | None, log_level: str, cfg, runtime: str = "worker") -> int:
    names = [only] if only else list(AGENTS)
    slots = [_Slot(agent, a * workers + i, backoff=cfg.restart_backoff_s)
             for a, agent in enumerate(names) for i in range(workers)]

    def start(s: _Slot) -> None:
        module = "streaming.agents.faust_app" if runtime == "faust" else "streaming.agents.worker"
        cmd = [sys.executable, "-m", module, s.agent, "--index", str(s.index), "--log-level", log_level]
        s.proc = subprocess.Popen(cmd, env=os.environ.copy(), preexec_fn=_die_with_parent(os.getpid()))
        s.started, s.restart_at = time.monotonic(), None
        log.info("started %s worker %d (pid %d)", s.agent, s.index, s.proc.pid)

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for s in slots:
        start(s)
    try:
        while not stopping:
            now = time.monotonic()
            for s in slots:
                if s.proc is not None and (rc := s.proc.poll()) is not None:
                    lived = now - s.started
                    s.backoff = cfg.restart_backoff_s if lived >= HEALTHY_AFTER_S else s.backoff
                    s.codes.append(rc)
                    s.proc, s.restart_at = None, now + s.backoff
                    s.restarts += 1
                    log.error("%s worker %d exited with code %s after %.1fs; restarting it in %.1fs (restart %d)",
                              s.agent, s.index, rc, lived, s.backoff, s.restarts)
                    s.backoff = min(s.backoff * 2, cfg.restart_backoff_max_s)
                elif s.proc is None and s.restart_at is not None and now >= s.restart_at:
                    start(s)
            time.sleep(0.2)
    finally:
        for s in slots:
            if s.proc is not None and s.proc.poll() is None:
                s.proc.terminate()
        for s in slots:
            if s.proc is None:
                continue
            try:
                s.proc.wait(60)
            except subprocess.TimeoutExpired:
                log.error("%s worker %d did not stop within 60s: killing it", s.agent, s.index)
                s.proc.kill()
                s.proc.wait()
    return 0


def main(args) -> int:
    """``lum agents`` (``args``: workers, only, log_level)."""
    from schemas.settings import KafkaSettings, load

    from .settings import AgentSettings

    cfg = load(AgentSettings)  # fail here, naming the variable, rather than in every worker
    load(KafkaSettings)
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    return supervise(args.workers, args.only, args.log_level, cfg, getattr(args, "runtime", "worker"))
