"""From a pytest configuration to a claims session: whether the plugin acts, which registry it
reads, which models and data it measures (`ModelRun`s, checked before any model runs), where its
reports and result cache go, and how measurements reach the terminal past pytest's capture."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from harness.data.problems import PROJECT_ROOT, WORK_ROOT, DataError, held_out_splits
from harness.judgment.claims import REGISTRY
from harness.measures.evaluation import REFERENCE_BATCH_SIZE
from harness.measures.runner import ModelRun
from harness.plugin.entry import INI
from harness.report.folder import REPORTS_DIR
from harness.runtime.arch import parse_heads
from harness.runtime.cache import DEFAULT_DIR, ResultCache
from harness.runtime.codi import ModelLoadError
from harness.runtime.models import SHIPPED, default_data, resolve, seed_heads


def registry_path(config: pytest.Config) -> Path:
    """The run's registry: --registry, else codi_registry (relative to the file that sets it),
    else hypotheses/claims.toml."""
    if config.getoption("registry"):
        return Path(config.getoption("registry"))
    if config.getini(INI):
        return (config.inipath.parent if config.inipath else config.rootpath) / config.getini(INI)
    return REGISTRY


def work_root(config: pytest.Config) -> Path:
    """Where reports/ and .cache/results/ go by default: beside the configuration that sets
    codi_registry (a researcher's project, even with this checkout installed editable), else
    this checkout, or the working directory of an installed package (`WORK_ROOT`)."""
    if config.getini(INI):
        return config.inipath.parent if config.inipath else config.rootpath
    return WORK_ROOT


def reports_dir(config: pytest.Config) -> Path:
    """Where run folders go (`REPORTS_DIR` in this checkout)."""
    return work_root(config) / REPORTS_DIR.relative_to(WORK_ROOT)


def runs_claims(config: pytest.Config) -> bool:
    """On for a run that names its claims (--registry, codi_registry) or a report folder, and for
    tests under this checkout's hypotheses/."""
    if config.getoption("report_dir") or config.getoption("registry") or config.getini(INI):
        return True
    hypotheses = (PROJECT_ROOT / "hypotheses").resolve()
    args = [Path(a.split("::")[0]).resolve() for a in config.args]
    return any(a == hypotheses or hypotheses in a.parents for a in args)


def load_runs(config: pytest.Config) -> tuple[dict[str, ModelRun], dict[str, str]]:
    """Every selected model's run (its problems, the user's heads) and the data source of each:
    checked before any model runs."""
    from harness.runtime.models import session_device

    n = config.getoption("n_problems")
    if n <= 0:
        raise DataError(f"--n-problems must be positive, got {n}")
    batch_size = config.getoption("batch_size")
    if batch_size is not None and batch_size <= 0:
        raise DataError(f"--batch-size must be positive, got {batch_size}")
    reference = config.getoption("reference_batching")
    if reference and batch_size not in (None, REFERENCE_BATCH_SIZE):
        raise DataError(f"--reference-batching runs the official batches of {REFERENCE_BATCH_SIZE}; drop --batch-size")
    cache_dir = config.getoption("cache_dir") or work_root(config) / DEFAULT_DIR.relative_to(WORK_ROOT)
    cache = ResultCache(None if config.getoption("no_cache") else cache_dir)
    runs = {}
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    device = session_device(config.getoption("device"), worker)
    serial = worker is None and not config.getoption("numprocesses", None)  # else each process runs some models
    names = config.getoption("model") or list(SHIPPED)
    data = {name: config.getoption("data") or default_data(name) for name in names}
    splits = {source: held_out_splits(source, n) for source in set(data.values())}  # before any model loads
    sources: dict[str, str] = {}  # model name -> its data source
    given: dict[str, str] = {}  # model name -> the --model value it came from
    for name in names:
        heads = config.getoption("heads")
        heads = seed_heads(name) if heads == "seed" else heads
        n_latent = config.getoption("n_latent")
        model = resolve(
            name, config.getoption("base"), n_latent, config.getoption("dtype"), device, cache, serial, reference
        )
        if model.name in runs:  # e.g. runs/seed0/final and runs/seed1/final: one would replace the other
            raise ModelLoadError(
                f"two --model values are both named {model.name!r} ({given[model.name]} and {name}): "
                "rename one folder, or run them separately"
            )
        given[model.name] = name
        geometry = model.facts.geometry  # from the cache, or by loading it: a broken checkpoint stops here
        problems, discovery = splits[data[name]]
        heads = parse_heads(heads, geometry, model.name) if heads is not None else None
        runs[model.name] = ModelRun(
            model, problems, discovery, cache, batch_size, config.getoption("seed"), heads, progress=serial
        )
        sources[model.name] = data[name]
    return runs, sources


class Uncaptured(io.TextIOBase):
    """The terminal's stderr past pytest's output capture (progress bars inside evaluations)."""

    def __init__(self, config: pytest.Config) -> None:
        self.capture = config.pluginmanager.getplugin("capturemanager")

    def write(self, text: str) -> int:
        with self.capture.global_and_fixture_disabled():
            sys.stderr.write(text)
            sys.stderr.flush()
        return len(text)

    def isatty(self) -> bool:
        with self.capture.global_and_fixture_disabled():
            return sys.stderr.isatty()


class Progress:
    """A line per finished measurement, as it happens: model, what, seconds, computed or read
    from the cache (cached ones only with -v); written past pytest's output capture."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def __call__(self, model: str, what: str, seconds: float, computed: bool) -> None:
        reporter = self.config.pluginmanager.getplugin("terminalreporter")
        verbose = self.config.get_verbosity()
        if reporter is None or verbose < -1 or (not computed and verbose < 1):
            return
        capture = self.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(f"  {model}: {what}: {seconds:.1f} s, {'computed' if computed else 'cached'}")
