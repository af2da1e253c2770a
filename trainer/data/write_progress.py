"""Progress of a .beton write: images written, images/s and the time left, as plain log lines.

FFCV's writer draws its own tqdm bar on stderr. In a SLURM log, which is no terminal, that bar is one line
that grows by a carriage return ten times a second for the hours ImageNet takes, and says nothing to
`tail`. `WriteProgress` takes the bar's place (`ffcv_progress`): every `REPORT_EVERY_S` seconds, and at the
end, it says one line such as `written 640000/1281167 images, 2210 img/s, ETA 04:50`; where a terminal
watches (and progress bars are on), a tqdm bar shows the same figures instead of the periodic lines.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

from tqdm import tqdm

REPORT_EVERY_S = 30.0


def clock_text(seconds: float) -> str:
    """mm:ss, or h:mm:ss from an hour on."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class WriteProgress:
    """The part of tqdm's interface FFCV's writer uses (`update(n)`, `close()`), reported as lines to `say`.

    The rate is the average since the start (images written / seconds elapsed), so the time left is what
    the whole write's pace predicts rather than the last few seconds' (a slow stretch of a shared
    filesystem does not make it jump). `clock`: seconds, monotonic; a test passes a fake one.
    """

    def __init__(self, total: int, say: Callable[[str], None] | None, *, label: str = "", bar: bool = False,
                 every_s: float = REPORT_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.total, self.say, self.label, self.every_s, self.clock = int(total), say, label, every_s, clock
        self.done = 0
        self.start = self.last_said = clock()
        self.bar = tqdm(total=self.total, desc=label or "writing", unit="img", dynamic_ncols=True,
                        leave=False) if bar else None

    def rate(self, now: float) -> float:
        elapsed = now - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, now: float) -> str:
        rate = self.rate(now)
        left = self.total - self.done
        eta = clock_text(left / rate) if rate > 0 else "unknown"
        return f"{self.label}written {self.done}/{self.total} images, {rate:.0f} img/s, ETA {eta}"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if self.say and self.done < self.total and now - self.last_said >= self.every_s:
            self.last_said = now
            self.say(self.line(now))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        now = self.clock()
        if self.say:
            self.say(f"{self.label}written {self.done}/{self.total} images in {clock_text(now - self.start)}, "
                     f"{self.rate(now):.0f} img/s")


@contextlib.contextmanager
def ffcv_progress(say: Callable[[str], None] | None, label: str = "", bar: bool = False):
    """Within this block, FFCV's writer reports through a WriteProgress instead of its own tqdm bar.

    FFCV makes its bar with the `tqdm` name of ffcv.writer, looked up when a write starts; binding that
    name is the one way in short of copying its write loop. `bar`: a tqdm bar where stderr is a terminal.
    """
    import ffcv.writer
    before = ffcv.writer.tqdm
    show_bar = bar and sys.stderr.isatty()
    ffcv.writer.tqdm = lambda total, **_: WriteProgress(total, say, label=label, bar=show_bar)
    try:
        yield
    finally:
        ffcv.writer.tqdm = before
