"""The one checkpoint utility: atomic small-file writes and "load the newest good checkpoint".

    from trainers.checkpoint import atomic_write, candidates, load_newest_good
    atomic_write(dir / "LATEST", name)                       # write, fsync, rename, fsync the directory
    path, state = load_newest_good(dir, load)                # load(path) -> state; raises if unusable

A checkpoint is a directory ``<dir>/ckpt-<sortable name>/`` holding ``meta.json`` (written last) and
``<dir>/LATEST`` names the newest durable one. ``candidates`` lists LATEST first, then older checkpoints
newest first; ``load_newest_good`` tries them in that order, logs a warning naming each one it skips and why
(corrupt files, unknown format, a failed tensor load), and returns the first that loads. ``Refuse`` raised
by ``load`` is not a fallback case (e.g. the saved model differs from the requested one): it propagates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Refuse(SystemExit):
    """The checkpoint is readable but must not be used as asked (the operator must decide): never a fallback."""


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest(checkpoint_dir: str | Path) -> Path | None:
    p = Path(checkpoint_dir) / "LATEST"
    try:
        name = p.read_text().strip()
    except FileNotFoundError:
        return None
    return Path(checkpoint_dir) / name if name else None


def candidates(checkpoint_dir: str | Path, prefix: str = "ckpt-") -> list[Path]:
    """LATEST first, then the other checkpoint directories no newer than it, newest first."""
    d = Path(checkpoint_dir)
    head = latest(d)
    dirs = sorted((p for p in d.glob(prefix + "*") if p.is_dir()), reverse=True)
    if head is not None:  # later names than LATEST are leftovers of a crash before LATEST moved: never durable
        dirs = [p for p in dirs if p.name < head.name]
        return [head, *dirs]
    return dirs


def load_newest_good(checkpoint_dir: str | Path, load: Callable[[Path], T]) -> tuple[Path, T] | None:
    """(path, load(path)) for the newest checkpoint that loads; None when there is none at all."""
    tried = []
    for path in candidates(checkpoint_dir):
        try:
            result = load(path)
        except Refuse:
            raise
        except BaseException as e:  # noqa: BLE001  (dcp's CheckpointException is a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)) and not isinstance(e, Refuse):
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            log.warning("checkpoint %s is unusable (%s: %s); falling back to an older one", path.name,
                        type(e).__name__, reason)
            tried.append(path.name)
            continue
        if tried:
            log.warning("resumed from the older checkpoint %s after skipping %s", path.name, tried)
        return path, result
    if tried:
        raise SystemExit(f"no usable checkpoint in {checkpoint_dir}: {tried} all failed to load (see warnings)")
    return None
