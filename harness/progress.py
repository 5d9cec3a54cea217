"""Where progress bars go: stderr, or the stream `show_on` sets (the pytest plugin's, which
writes past pytest's output capture, so long evaluations show a bar in a claims run)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

_STREAMS: list[TextIO] = []  # innermost last; empty: tqdm's default (stderr)


def bar(*args: Any, **kwargs: Any) -> tqdm:
    """A tqdm bar on the current progress stream."""
    return tqdm(*args, file=_STREAMS[-1] if _STREAMS else None, **kwargs)


@contextmanager
def show_on(stream: TextIO) -> Iterator[None]:
    """Bars made inside this block write to `stream`."""
    _STREAMS.append(stream)
    try:
        yield
    finally:
        _STREAMS.remove(stream)
