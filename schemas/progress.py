"""Progress of long CLI jobs (``lum pretrain``, ``lum replay``, ``lum backfill``, ``lum produce`` of a file).

    from schemas.progress import progress
    with progress("replay", total=n_or_None, unit="events") as p:
        for batch in ...:
            p.update(len(batch))
            p.note(skipped=3)                 # optional extra figures shown on the bar / log line

On a terminal (stderr is a TTY): a tqdm bar with count, rate and ETA (ETA only when ``total`` is known), and
log lines printed meanwhile do not break it. Otherwise (logs to a file, docker, CI): one log line every
``every_s`` seconds and one at the end: ``replay: 120,000/480,000 events (25.0%), 10,512/s, ETA 0:00:34``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

log = logging.getLogger("lum.progress")


class Progress:
    def __init__(self, desc: str, total: float | None = None, unit: str = "it", every_s: float = 10.0,
                 tty: bool | None = None, logger: logging.Logger | None = None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.n = 0.0
        self.extra: dict[str, object] = {}
        self.log = logger or log
        self.t0 = self._last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.log.info(self.line())

    def note(self, **figures: object) -> None:
        self.extra.update(figures)
        if self.bar is not None:
            self.bar.set_postfix(self.extra, refresh=False)

    def rate(self) -> float:
        return self.n / max(time.monotonic() - self.t0, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        done = f"{self.n:,.0f}"
        if self.total:
            done += f"/{self.total:,.0f} {self.unit} ({100 * self.n / self.total:.1f}%)"
            eta = f", ETA {timedelta(seconds=round((self.total - self.n) / rate))}" if rate > 0 else ""
        else:
            done += f" {self.unit}"
            eta = ""
        extra = "".join(f", {k} {v}" for k, v in self.extra.items())
        return f"{self.desc}: {done}, {rate:,.0f}/s{eta}{extra}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        else:
            self.log.info(self.line())


@contextlib.contextmanager
def progress(desc: str, total: float | None = None, unit: str = "it", every_s: float = 10.0,
             tty: bool | None = None) -> Iterator[Progress]:
    """A progress reporter for one job; its final line (or the closed bar) is written on exit."""
    p = Progress(desc, total, unit, every_s, tty)
    if p.bar is None:
        try:
            yield p
        finally:
            p.close()
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines go above the bar instead of through it
            yield p
    finally:
        p.close()
