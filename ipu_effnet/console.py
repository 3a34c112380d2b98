"""What the commands print, with and without a terminal.

Progress bars. On a terminal they are tqdm's. When stderr, where bars go, is not a terminal (a log file,
CI, `nohup`, poprun's per-instance logs), a bar redraws itself with carriage returns that a file keeps,
every frame of it; there `progress_bar` gives a `LineProgress` instead, which prints one plain line
every `interval` seconds (logging.progress_interval for the training loop, 60 s by default) and nothing
else, so a log holds the lines the commands print and a heartbeat during long epochs:

    from ipu_effnet.console import progress_bar          # a drop-in for tqdm.tqdm
    bar = progress_bar(total=n, desc="epoch 1/5", unit="step", disable=not show)
    bar.update(1); bar.set_postfix(loss="2.301", refresh=False); bar.close()
    progress_bar.write("a line that does not tear a bar")  # tqdm.write on a terminal, else print

Ranks. Under torchrun (RANK) or poprun (POPDIST_INSTANCE_INDEX) every process runs the same command;
`quiet_other_ranks` points standard output of every process but the main one at /dev/null, so those
print only what goes to stderr: warnings and errors. The command line calls it before any command runs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

__all__ = ["LineProgress", "interactive", "process_rank", "progress_bar", "quiet_other_ranks", "write"]

DEFAULT_INTERVAL = 60.0


def interactive(stream: Optional[TextIO] = None) -> bool:
    """True when `stream` (default: stderr, where progress goes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def process_rank() -> int:
    """This process's rank under torchrun (RANK) or poprun (POPDIST_INSTANCE_INDEX); 0 alone."""
    for key in ("RANK", "POPDIST_INSTANCE_INDEX"):
        value = os.environ.get(key, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def quiet_other_ranks() -> bool:
    """Send stdout of every process but the main one to /dev/null; True when this one was quietened."""
    if process_rank() == 0:
        return False
    sys.stdout.flush()
    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (for the life of the process)
    return True


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60:d}:{seconds % 60:02d}"
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """A progress bar for logs: one plain line every `interval` seconds (none in between, none at all
    for work shorter than that), on `file` (default stderr). The subset of tqdm's interface that this
    project uses: update, set_postfix, set_description, close, iteration, and `n`/`total`."""

    def __init__(self, iterable: Optional[Iterable[Any]] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", disable: bool = False, interval: float = DEFAULT_INTERVAL,
                 file: Optional[TextIO] = None, clock: Any = time.monotonic, initial: int = 0) -> None:
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.desc = desc
        self.unit = unit
        self.disable = bool(disable)
        self.interval = float(interval)
        self.file = file
        self.clock = clock
        self.n = self.initial = int(initial)  # work done before this bar started (a resumed download)
        self.postfix = ""
        self.start = clock()
        self.last = self.start
        self.lines = 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable if self.iterable is not None else ():
            yield item
            self.update(1)

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.initial) / max(now - self.start, 1e-9)
        eta = ""
        if self.total and self.n:
            eta = f", about {_format_seconds((self.total - self.n) / max(rate, 1e-9))} left"
        post = f", {self.postfix}" if self.postfix else ""
        desc = f"{self.desc}: " if self.desc else ""
        print(f"{desc}{done} {self.unit}{pct}, {_format_seconds(now - self.start)} elapsed{eta}{post}",
              file=self.file or sys.stderr, flush=True)
        self.lines += 1

    def refresh(self) -> None:
        return None

    def close(self) -> None:
        return None


def progress_bar(iterable: Optional[Iterable[Any]] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", disable: bool = False, interval: float = DEFAULT_INTERVAL, initial: int = 0,
                 **tqdm_kwargs: Any):
    """tqdm's bar on a terminal; a `LineProgress` when stderr is not one (or when disabled)."""
    if disable or not interactive():
        return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, interval=interval,
                            initial=initial)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, **tqdm_kwargs)


def write(message: str, file: Optional[TextIO] = None) -> None:
    """Print a line: through tqdm.write on a terminal (bars stay whole), else a plain print."""
    if interactive():
        from tqdm import tqdm

        tqdm.write(message, file=file)
    else:
        print(message, file=file or sys.stdout, flush=True)


progress_bar.write = write  # type: ignore[attr-defined]  # tqdm.write's place, for drop-in use
