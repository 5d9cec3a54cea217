"""From a pytest configuration to a claims session: whether the plugin acts, which registry it
reads, which models and data it measures (`ModelRun`s, checked before any model runs), where its
reports and result cache go, and how measurements reach the terminal past pytest's capture."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from harness.data.problems import WORK_ROOT, DataError, held_out_splits
from harness.judgment.claims import REGISTRY
from harness.measures.evaluation import REFERENCE_BATCH_SIZE
from harness.measures.runner import ModelRun
from harness.plugin.entry import INI
from harness.report.folder import REPORTS_DIR
from harness.runtime.arch import parse_heads
from harness.runtime.cache import DEFAULT_DIR, ResultCache
from harness.runtime.codi import ModelLoadError
from harness.runtime.models import MODEL_SPECS, SHIPPED, default_data, is_hub_format, resolve, seed_heads

MIN_BASELINE = 5.0  # points: a model below this baseline accuracy is not judged (--min-baseline)


def run_root(config: pytest.Config) -> Path:
    """The run's own folder: the configuration file's (pytest.ini, pyproject.toml, ...), else
    pytest's rootdir. Never where the package is installed: a clone run while another checkout
    is installed editable measures its own claims."""
    return config.inipath.parent if config.inipath else config.rootpath


def _own_registry(config: pytest.Config) -> Path | None:
    """The run's own hypotheses/claims.toml, where it has one."""
    own = run_root(config) / "hypotheses" / "claims.toml"
    return own if own.is_file() else None


def registry_path(config: pytest.Config) -> Path:
    """The run's registry: --registry, else codi_registry (relative to the file that sets it),
    else the run's own hypotheses/claims.toml, else the package's."""
    if config.getoption("registry"):
        return Path(config.getoption("registry"))
    if config.getini(INI):
        return run_root(config) / config.getini(INI)
    return _own_registry(config) or REGISTRY


def work_root(config: pytest.Config) -> Path:
    """Where reports/ and .cache/results/ go by default: beside the run's own configuration
    when it names a registry (codi_registry) or holds hypotheses/claims.toml (a researcher's
    project, or a checkout wherever the package is installed from), else `WORK_ROOT` (the
    working directory of an installed package)."""
    if config.getini(INI) or _own_registry(config):
        return run_root(config)
    return WORK_ROOT


def reports_dir(config: pytest.Config) -> Path:
    """Where run folders go (`REPORTS_DIR` in this checkout)."""
    return work_root(config) / REPORTS_DIR.relative_to(WORK_ROOT)


def runs_claims(config: pytest.Config) -> bool:
    """On for a run that names its claims (--registry, codi_registry) or a report folder, and for
    tests under the run's own hypotheses/."""
    if config.getoption("report_dir") or config.getoption("registry") or config.getini(INI):
        return True
    hypotheses = (run_root(config) / "hypotheses").resolve()
    args = [Path(a.split("::")[0]).resolve() for a in config.args]
    return any(a == hypotheses or hypotheses in a.parents for a in args)


def model_names(values: list[str]) -> dict[str, str]:
    """Each --model value's name in the run: a shipped name as it is, a path by its folder,
    lengthened by its parents where two folders share a name (`gpt2-ckpt`, `llama-ckpt`)."""
    parts = {v: (v,) if v in MODEL_SPECS else Path(v).resolve().parts for v in values}
    for depth in range(1, 1 + max((len(p) for p in parts.values()), default=1)):
        names = {v: "-".join(p[-depth:]) for v, p in parts.items()}
        if len(set(names.values())) == len(values):
            return names
    return {v: "-".join(p) for v, p in parts.items()}


def model_bases(config: pytest.Config, values: list[str]) -> dict[str, str | None]:
    """Each --model value's --base: one --base serves every model; several go, in order, to the
    hub-format models (those that need one), one each."""
    bases = config.getoption("base") or []
    hub = [v for v in values if is_hub_format(v)]
    if bases and not hub:
        raise ModelLoadError(f"--base is for hub-format checkpoints; {', '.join(values)} record their own base")
    if len(bases) <= 1:
        return {v: (bases[0] if bases else None) for v in values}
    if len(bases) != len(hub):
        raise ModelLoadError(
            f"{len(bases)} --base values for {len(hub)} hub-format --model values ({', '.join(hub)}): give one "
            "--base for all, or one per hub-format model in the same order"
        )
    given = dict(zip(hub, bases))
    return {v: given.get(v) for v in values}


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
    max_new_tokens = config.getoption("max_new_tokens")
    if max_new_tokens <= 0:
        raise DataError(f"--max-new-tokens must be positive, got {max_new_tokens}")
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
    bases, display = model_bases(config, names), model_names(names)
    sources: dict[str, str] = {}  # model name -> its data source
    given: dict[str, str] = {}  # model name -> the --model value it came from
    for name in names:
        heads = config.getoption("heads")
        heads = seed_heads(name) if heads == "seed" else heads
        n_latent = config.getoption("n_latent")
        model = resolve(
            name, bases[name], n_latent, config.getoption("dtype"), device, cache, serial, reference, display[name]
        )
        if model.name in runs:  # the same --model value twice
            raise ModelLoadError(f"--model {name} is named twice ({given[model.name]}): name each model once")
        given[model.name] = name
        geometry = model.facts.geometry  # from the cache, or by loading it: a broken checkpoint stops here
        problems, discovery = splits[data[name]]
        heads = parse_heads(heads, geometry, model.name) if heads is not None else None
        runs[model.name] = ModelRun(
            model,
            problems,
            discovery,
            cache,
            batch_size,
            config.getoption("seed"),
            heads,
            progress=serial,
            max_new_tokens=max_new_tokens,
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
