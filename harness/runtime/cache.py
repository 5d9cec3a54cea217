"""On-disk cache of experiment results, keyed by content.

A key hashes the model fingerprint, the data, the decoding config, the intervention spec and
the cache version; a change of any of them is a new entry. Writes are atomic (a temporary
file renamed into place) and a file lock makes concurrent pytest-xdist workers compute an
entry once. An unreadable entry is recomputed; a writer killed mid-write leaves only a
`<key>.*.tmp` file, never read as an entry and removed by the next writer of that key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from filelock import FileLock

from harness.data.problems import WORK_ROOT

CACHE_VERSION = 1
DEFAULT_DIR = WORK_ROOT / ".cache" / "results"
log = logging.getLogger(__name__)


def content_key(**parts) -> str:
    """A short hash of `parts` (order-independent) and CACHE_VERSION."""
    payload = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class ResultCache:
    """Arrays of per-problem results (e.g. correctness flags) under content keys. Without a
    directory (`--no-cache`) nothing is read from or written to disk, and each key is still
    computed once per process (a condition several claims read is not recomputed)."""

    def __init__(self, directory: str | Path | None = DEFAULT_DIR):
        self.directory = Path(directory) if directory is not None else None
        self.hits = self.misses = 0
        self._memory: dict[str, np.ndarray] = {}  # no directory: this process's results

    def __contains__(self, key: str) -> bool:
        if self.directory is None:
            return key in self._memory
        return (self.directory / f"{key}.npy").exists()

    def get_or_compute(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The entry under `key`, or `compute()` stored there (once, even across processes)."""
        if self.directory is None:
            if key in self._memory:
                self.hits += 1
            else:
                self.misses += 1
                self._memory[key] = np.asarray(compute())
            return self._memory[key].copy()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{key}.npy"
        with FileLock(str(path) + ".lock"):
            if path.exists():
                try:
                    value = np.load(path, allow_pickle=False)
                    self.hits += 1
                    return value
                except (ValueError, OSError, EOFError) as e:
                    log.warning("cache entry %s is unreadable (%s); recomputing", path.name, e)
            for stale in self.directory.glob(f"{key}.*.tmp"):  # left by a killed writer: we hold the lock
                stale.unlink(missing_ok=True)
            self.misses += 1
            value = np.asarray(compute())
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f"{key}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, value, allow_pickle=False)
            os.replace(tmp, path)
            return value
