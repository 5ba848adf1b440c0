"""Progress of a batch job: a tqdm bar (rows, tok/s, ETA) on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, total: int, done: int = 0, stream: Optional[TextIO] = None, enabled: Optional[bool] = None,
                 every_seconds: float = 10.0):
        self.stream = stream or sys.stderr
        self.total, self.done, self.tokens = total, done, 0
        self.start = time.perf_counter()
        self._last_line = self.start
        self.every_seconds = every_seconds
        self.enabled = True if enabled is None else enabled
        self._bar = None
        if self.enabled and enabled is None and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="row", file=self.stream, dynamic_ncols=True)

    def update(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tokens / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
            self._bar.update(1)
        elif self.enabled and (self.done == self.total or time.perf_counter() - self._last_line >= self.every_seconds):
            self._last_line = time.perf_counter()
            print(f"inferencer: {self.done}/{self.total} rows, {self.tokens / max(elapsed, 1e-9):.1f} tok/s, "
                  f"{elapsed:.1f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
