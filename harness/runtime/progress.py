"""Where progress bars go: stderr, or the stream `show_on` sets (the pytest plugin's, which
writes past pytest's output capture, so long evaluations show a bar in a claims run). On a
stream that is not a terminal (a CI log, `2> run.log`) a bar updates at most every 30 s: a
long run still shows it is moving, and the log does not fill with redraws."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

_STREAMS: list[TextIO] = []  # innermost last; empty: tqdm's default (stderr)


LOG_INTERVAL_S = 30.0  # the least time between two updates of a bar written to a log


def bar(*args: Any, **kwargs: Any) -> tqdm:
    """A tqdm bar on the current progress stream."""
    stream = _STREAMS[-1] if _STREAMS else sys.stderr
    if not stream.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(*args, file=stream, **kwargs)


@contextmanager
def show_on(stream: TextIO) -> Iterator[None]:
    """Bars made inside this block write to `stream`."""
    _STREAMS.append(stream)
    try:
        yield
    finally:
        _STREAMS.remove(stream)
