"""Model specs: a name -> where its checkpoint is, which base it needs, how many thoughts.

`load(model, base)` accepts a spec name, a directory of ours, a hub-format directory or
`pytorch_model.bin`, or a hub id, and fails with one line naming the problem.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from harness.data.problems import PROJECT_ROOT
from harness.runtime.arch import HeadGeometry
from harness.runtime.cache import ResultCache, content_key
from harness.runtime.codi import (
    DEFAULT_N_LATENT,
    HUB_WEIGHTS,
    OWN_META,
    CODIModel,
    ModelLoadError,
    fetch_hub_weights,
    load_hub_format,
    load_own,
)

MODELS_DIR = PROJECT_ROOT / "fixtures" / "models"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    checkpoint: str  # a directory of ours, or a hub id / local copy in the hub format
    base: str | None = None  # base LM (HF id or directory) for hub-format checkpoints
    n_latent: int = DEFAULT_N_LATENT
    default_data: str = "synthetic"
    seed_heads: tuple[str, ...] = ()  # the seed analysis's critical heads (`--heads seed`)


MODEL_SPECS: dict[str, ModelSpec] = {
    "tiny-gpt2": ModelSpec("tiny-gpt2", "gpt2", str(MODELS_DIR / "tiny-gpt2")),
    "tiny-llama": ModelSpec("tiny-llama", "llama", str(MODELS_DIR / "tiny-llama")),
    "codi-gpt2": ModelSpec(
        "codi-gpt2", "gpt2", "zen-E/CODI-gpt2", base="gpt2", default_data="gsm8k", seed_heads=("L0H3",)
    ),
    "codi-llama": ModelSpec(
        "codi-llama",
        "llama",
        "zen-E/CODI-llama3.2-1b-Instruct",
        base="meta-llama/Llama-3.2-1B-Instruct",
        default_data="gsm8k",
        seed_heads=("L4H5", "L5H30", "L5H28"),
    ),
}
SHIPPED = ("tiny-gpt2", "tiny-llama")


def seed_heads(model: str) -> str:
    """The seed analysis's head list of a named model, as a `--heads` value."""
    spec = MODEL_SPECS.get(model)
    if spec is None or not spec.seed_heads:
        known = ", ".join(n for n, s in MODEL_SPECS.items() if s.seed_heads)
        raise ModelLoadError(f"--heads seed: no seed head list for {model!r} (there is one for {known})")
    return ",".join(spec.seed_heads)


def default_data(model: str) -> str:
    """The data a model is evaluated on unless `--data` says otherwise: a named model's own; a
    checkpoint of ours, the synthetic problems it was trained on; a hub-format checkpoint (a
    path or hub id), GSM8K, like the published CODI checkpoints."""
    spec = MODEL_SPECS.get(model)
    if spec is not None:
        return spec.default_data
    return "synthetic" if (Path(model) / OWN_META).is_file() else "gsm8k"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_BATCH_SIZE = 128  # fastest on the 2-core reference machine (docs/performance.md)
MAX_AUTO_BATCH = 512
AUTO_BATCH_TOKENS = 512  # a GSM8K question (< 256 tokens), bot, K thoughts, eot, 256 new tokens
_WORKER = re.compile(r"gw(\d+)")


@dataclass(frozen=True)
class Source:
    """Where a `--model` value's weights are: checked, not loaded."""

    name: str
    path: Path  # a directory of ours, or a hub-format pytorch_model.bin
    base: str | None = None  # the base LM of a hub-format checkpoint (HF id or directory)
    n_latent: int = DEFAULT_N_LATENT  # hub format only (ours records it in codi.json)

    def load(self) -> CODIModel:
        if self.base is None:
            return load_own(self.path, name=self.name)
        return load_hub_format(self.path, self.base, self.n_latent, name=self.name)

    def files(self) -> list[Path] | None:
        """Every file the model is loaded from, or None where they cannot be listed without
        loading (a base named by a hub id that is not in the local hub cache)."""
        if self.base is None:
            return _files_under(self.path)
        base = Path(self.base)
        if not base.is_dir():
            from huggingface_hub import snapshot_download

            try:
                base = Path(snapshot_download(self.base, local_files_only=True))
            except Exception:  # noqa: BLE001 - not cached (or not a hub id): the facts come from loading
                return None
        return [self.path.resolve(), *_files_under(base)]


def _files_under(directory: Path) -> list[Path]:
    return sorted(p.resolve() for p in directory.rglob("*") if p.is_file())


@dataclass(frozen=True)
class ModelFacts:
    """What the harness needs of a model besides running it: result keys, head lists and
    thought names are built from these, so a run whose results are all cached loads no weights."""

    name: str
    fingerprint: str  # hash of every weight, as loaded and cast (`CODIModel.fingerprint`)
    n_latent: int
    geometry: HeadGeometry

    @classmethod
    def of(cls, codi: CODIModel) -> ModelFacts:
        return cls(codi.name, codi.fingerprint(), codi.n_latent, codi.geometry)

    def packed(self) -> np.ndarray:
        return np.asarray(json.dumps(asdict(self)))  # a 0-d string array: cached without pickle

    @classmethod
    def unpack(cls, packed: np.ndarray) -> ModelFacts:
        fields = json.loads(str(packed))
        return cls(**{**fields, "geometry": HeadGeometry(**fields["geometry"])})


class LazyModel:
    """A resolved `--model`, loaded on the first use of `codi`.

    Its `facts` come from the result cache while its files keep the paths, sizes and
    modification times they had when the facts were recorded (make's rule), else from loading
    it. So a warm run, or the pytest-xdist controller, never holds weights it does not run.
    """

    def __init__(
        self,
        source: Source | None,
        dtype: str,
        device: str,
        cache: ResultCache | None = None,
        keep: bool = True,
        reference_batching: bool = False,
    ):
        self.source, self.dtype, self.device = source, dtype, device
        self.reference_batching = reference_batching  # set on the model at load (see `runtime`)
        self.cache = cache or ResultCache(None)
        self.keep = keep  # a copy loaded only to read the facts is kept (False: freed, see `_fresh_facts`)
        self._codi: CODIModel | None = None

    @classmethod
    def of(cls, codi: CODIModel) -> LazyModel:
        """A model already in memory."""
        model = cls(
            None, str(codi.dtype).removeprefix("torch."), str(codi.device), reference_batching=codi.reference_batching
        )
        model._codi = codi
        return model

    @property
    def name(self) -> str:
        return self.source.name if self.source else self._codi.name

    @property
    def loaded(self) -> bool:
        return self._codi is not None

    @property
    def device_type(self) -> str:
        """Where it runs (part of every result key: CPU and GPU kernels round differently)."""
        return self._codi.device.type if self._codi is not None else torch.device(self.device).type

    @property
    def codi(self) -> CODIModel:
        if self._codi is None:
            self._codi = self.source.load().cast(DTYPES[self.dtype]).to(torch.device(self.device))
            self._codi.reference_batching = self.reference_batching
        return self._codi

    @cached_property
    def facts(self) -> ModelFacts:
        files = self.source.files() if self.source else None
        if files is None:
            return ModelFacts.of(self.codi)
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        key = content_key(kind="model_facts", files=stats, dtype=self.dtype, name=self.name, n=self.source.n_latent)
        fresh = None if key in self.cache else self._fresh_facts()  # a broken checkpoint fails before a write
        return ModelFacts.unpack(self.cache.get_or_compute(key, lambda: (fresh or self._fresh_facts()).packed()))

    def _fresh_facts(self) -> ModelFacts:
        if self.loaded or self.keep:
            return ModelFacts.of(self.codi)
        # a copy on the CPU, freed: the same weights bit for bit, and no GPU holds a model this
        # process may never run (the xdist controller; a worker of another model's group)
        return ModelFacts.of(self.source.load().cast(DTYPES[self.dtype]))


def resolve(
    model: str,
    base: str | None = None,
    n_latent: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    cache: ResultCache | None = None,
    keep: bool = True,
    reference_batching: bool = False,
    name: str | None = None,
) -> LazyModel:
    """Check a `--model` value (and optional `--base`), its dtype and device, and where its
    files are, without loading its weights; fails with one line naming the problem. `keep`:
    a model loaded to record its facts stays loaded (a serial session runs every model).
    `reference_batching`: the model runs the official evaluator's batching (`runtime`).
    `name`: the model's name in the run (default: its shipped name or folder)."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    try:
        target = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; e.g. cpu, cuda, cuda:1") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    return LazyModel(_source(model, base, n_latent, name), dtype, device, cache, keep, reference_batching)


def load(
    model: str,
    base: str | None = None,
    n_latent: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    reference_batching: bool = False,
) -> CODIModel:
    """Resolve a `--model` value (and optional `--base`) to a loaded, merged CODI model in eval
    mode, on `device` with its weights in `dtype` (`DTYPES`). LoRA is merged in float32 first.
    `reference_batching`: it runs the official evaluator's batching (`runtime`)."""
    return resolve(model, base, n_latent, dtype, device, reference_batching=reference_batching).codi


def is_hub_format(model: str) -> bool:
    """Whether a --model value is a checkpoint in the published format (it needs a base model),
    rather than one of ours (which records its own)."""
    spec = MODEL_SPECS.get(model)
    path = Path(spec.checkpoint if spec else model)
    return not (path.is_dir() and (path / OWN_META).is_file())


def _source(model: str, base: str | None, n_latent: int | None, name: str | None = None) -> Source:
    spec = MODEL_SPECS.get(model)
    source = spec.checkpoint if spec else model
    base = base or (spec.base if spec else None)
    if n_latent is not None and n_latent < 1:
        raise ModelLoadError(f"--n-latent must be at least 1, got {n_latent}")
    k = n_latent or (spec.n_latent if spec else DEFAULT_N_LATENT)
    name = name or (spec.name if spec else Path(model).name)
    path = Path(source)
    if path.is_dir() and (path / OWN_META).is_file():
        recorded = json.loads((path / OWN_META).read_text()).get("n_latent")
        if n_latent is not None and n_latent != recorded:
            raise ModelLoadError(
                f"{name} was trained with {recorded} thoughts ({path / OWN_META}); --n-latent {n_latent} contradicts "
                "it (--n-latent is for hub-format checkpoints, which do not record it)"
            )
        return Source(name, path)
    if path.is_dir() and (path / HUB_WEIGHTS).is_file():
        path = path / HUB_WEIGHTS
    if path.is_file():
        if base is None:
            raise ModelLoadError(f"{path} is a hub-format checkpoint: pass its base model with --base ID_OR_DIR")
        return Source(name, path, base, k)
    if path.exists():
        raise ModelLoadError(f"{path} is not a CODI checkpoint (no {OWN_META} or {HUB_WEIGHTS})")
    if spec is None and (model.startswith((".", "/")) or model.count("/") != 1):
        known = ", ".join(MODEL_SPECS)
        raise ModelLoadError(f"model {model!r} not found: not a path, a hub id or a known name ({known})")
    if base is None:
        raise ModelLoadError(f"hub id {source!r} needs its base model: pass --base ID_OR_DIR")
    return Source(name, fetch_hub_weights(source), base, k)


def default_batch_size(codi: CODIModel) -> int:
    """Problems per batched pass when the user names none: `CPU_BATCH_SIZE` off CUDA, else
    `batch_size_for_memory` of the GPU's free memory."""
    if codi.device.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(codi.device)
    return batch_size_for_memory(codi, free)


def batch_size_for_memory(codi: CODIModel, free_bytes: int) -> int:
    """How many problems half of `free_bytes` holds: the KV cache of `AUTO_BATCH_TOKENS` tokens
    per problem (twice over: the cache grows by concatenation) and the logits (in the weights'
    dtype, a float32 copy and its softmax); between 1 and `MAX_AUTO_BATCH`."""
    geo = codi.geometry
    width = codi.dtype.itemsize
    kv_per_token = 2 * geo.n_layers * geo.n_kv_heads * geo.head_dim * width
    logits = codi.lm.config.vocab_size * (width + 2 * 4)
    per_problem = 2 * AUTO_BATCH_TOKENS * kv_per_token + logits
    return max(1, min(MAX_AUTO_BATCH, free_bytes // 2 // per_problem))


def worker_device(device: str, worker: str | None, n_gpus: int) -> str:
    """The device of one pytest-xdist worker: `cuda` becomes `cuda:<worker index mod n_gpus>`
    (worker ids are gw0, gw1, ...); an explicit index, the CPU, or no worker keeps `device`."""
    match = _WORKER.fullmatch(worker or "")
    if device != "cuda" or match is None or n_gpus < 1:
        return device
    return f"cuda:{int(match.group(1)) % n_gpus}"


def session_device(device: str, worker: str | None) -> str:
    """`worker_device` with this machine's GPU count; a worker makes its GPU the current one.
    Any other process leaves CUDA uninitialised (the xdist controller never runs a model)."""
    if device != "cuda" or not torch.cuda.is_available():
        return device
    resolved = worker_device(device, worker, torch.cuda.device_count())
    if resolved != device:
        torch.cuda.set_device(torch.device(resolved))
    return resolved
