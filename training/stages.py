"""Progress of a multi-stage command (`dare prepare`, `dare synth`): one line per stage on stderr, and the seconds
each stage took."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class StageProgress:
    """Rich progress on stderr: one line per stage (spinner or bar) and the seconds each stage took."""

    def __init__(self, enabled: bool) -> None:
        self.seconds: dict[str, float] = {}
        self._enabled = enabled
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )

    def __enter__(self) -> StageProgress:
        if self._enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled:
            self._progress.stop()

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Time a stage; yields `advance(n)` for stages with a known total."""
        task = self._progress.add_task(name, total=total)
        start = time.perf_counter()
        yield lambda n: self._progress.advance(task, n)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        done = self._progress.tasks[task].completed if total is not None else 1
        self._progress.update(task, total=max(done, 1), completed=max(done, 1))
