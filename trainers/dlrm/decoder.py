"""Decoding of fetched ``training-examples`` messages in a child process, beside the trainer's step.

    dec = DecoderProcess()        # starts ``python -m trainers.dlrm.decoder``
    dec.submit(values)            # the message values of one fetch (a few may be outstanding)
    cols, errors, keys, features = dec.result()   # the oldest submission's ``decode_fetch``
    dec.featurize_with(cfg)       # from now on it featurizes too (``features``: FeatureColumns, else None)
    dec.close()                   # the child exits (it is killed if it has not within 5 s)

Why a process: decoding and featurizing hold the GIL, so in a thread they take turns with the step's Python
instead of overlapping it; in the child they run on the other core (on 2 cores shared with the broker: end to end
from Kafka at 0.88-1.11 of featurize + step in one thread, against 0.58-0.95 with both in the reading thread). The
child ignores SIGINT and SIGTERM (the trainer's stop signals: the trainer finishes its batch, then closes the
child) and exits when its stdin closes, so it never outlives the trainer, even one killed with SIGKILL. Framing,
both ways: u64 length + pickle (the columns and features pickle as a few arrays and lists). A reader thread in
the child takes requests off the pipe as they come, so neither side can block the other on a full pipe.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)
_LEN = struct.Struct("<Q")
ROOT = Path(__file__).resolve().parents[2]


def _read(f: BinaryIO) -> bytes | None:
    head = f.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    data = f.read(n)
    return data if len(data) == n else None


def _write(f: BinaryIO, data: bytes) -> None:
    f.write(_LEN.pack(len(data)))
    f.write(data)
    f.flush()


def decode_fetch(values: list[bytes | None], featurizer=None) -> tuple:
    """(columns, errors, keys, features) of a fetch: ``schemas.codec.decode_columns`` of its values, the dedup
    key of each decoded example, and, given a ``Featurizer``, its ``FeatureColumns`` (else None)."""
    from schemas.codec import decode_columns

    from .dedup import RecentIds

    cols, errors = decode_columns(values)
    features = None
    if featurizer is not None and len(cols):
        try:
            features = featurizer.columns(cols)
        except Exception:  # noqa: BLE001 - the trainer featurizes these itself (and reports what fails there)
            log.exception("featurizing a fetch of %d examples failed; the trainer featurizes it", len(cols))
    return cols, errors, RecentIds.keys(cols.example_id), features


class DecoderProcess:
    def __init__(self) -> None:
        # cwd: ``-m`` puts the repository first on the child's path, installed or not
        self.proc = subprocess.Popen([sys.executable, "-m", "trainers.dlrm.decoder"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=ROOT)
        self.pending: deque[int] = deque()  # sizes of the outstanding submissions

    @property
    def outstanding(self) -> int:
        return len(self.pending)

    def _died(self) -> RuntimeError:
        code = self.proc.poll()
        return RuntimeError(f"the decoder process (pid {self.proc.pid}) ended"
                            + (f" with exit code {code}" if code is not None else "") + "; see its stderr above")

    def submit(self, values: list[bytes | None]) -> None:
        try:
            _write(self.proc.stdin, pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, ValueError):  # ValueError: closed
            raise self._died() from None
        self.pending.append(len(values))

    def featurize_with(self, cfg) -> None:
        """Featurize what is submitted from now on with a ``Featurizer`` of ``cfg`` (a ``DLRMConfig``)."""
        try:
            _write(self.proc.stdin, pickle.dumps(cfg.model_dump(), protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, ValueError):
            raise self._died() from None

    def result(self) -> tuple:
        n = self.pending.popleft()
        data = _read(self.proc.stdout)
        if data is None:
            raise self._died()
        cols, errors, keys, features = pickle.loads(data)
        assert len(cols) + len(errors) == n and len(keys) == len(cols), (len(cols), len(errors), n)
        return cols, errors, keys, features

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):  # EOF for its reader; EPIPE for a reply in progress
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")  # the replies; anything printed goes to stderr
    os.dup2(2, 1)
    requests: queue.Queue[bytes | None] = queue.Queue()

    def take() -> None:
        while True:
            data = _read(sys.stdin.buffer)
            requests.put(data)
            if data is None:
                return

    threading.Thread(target=take, daemon=True).start()
    # The featurizer's imports (torch: seconds) while the trainer builds its model, not once it hands the config over
    threading.Thread(target=importlib.import_module, args=("trainers.dlrm.features",), daemon=True).start()
    featurizer = None
    while (data := requests.get()) is not None:
        request = pickle.loads(data)
        if isinstance(request, dict):  # a DLRMConfig's fields: featurize from now on
            from .features import Featurizer
            from .model import DLRMConfig

            featurizer = Featurizer(DLRMConfig(**request), remote=True)
            continue
        results = decode_fetch(request, featurizer)
        try:
            _write(out, pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL))
        except BrokenPipeError:  # the trainer closed or died
            break
    try:
        out.close()
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
