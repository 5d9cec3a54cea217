"""The result cache never lies: content keys, unreadable entries, killed writers, concurrent writers."""

import copy
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from harness.data.problems import synthetic_split
from harness.interventions.paths import PatchPath
from harness.interventions.specs import AblateHeads, PatchThoughts
from harness.measures.runner import ModelRun
from harness.runtime import cache as cache_module
from harness.runtime.cache import ResultCache, content_key

ROOT = Path(__file__).resolve().parent.parent


def test_cache_computes_once_and_keys_by_content(tmp_path):
    cache = ResultCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return np.array([True, False, True])

    key = content_key(model="a", spec={"heads": ["L0H1"]})
    assert cache.get_or_compute(key, compute).tolist() == [True, False, True]
    assert cache.get_or_compute(key, compute).tolist() == [True, False, True]
    assert len(calls) == 1 and cache.hits == 1
    assert content_key(model="a", spec={"heads": ["L0H2"]}) != key
    assert content_key(spec={"heads": ["L0H1"]}, model="a") == key


@pytest.mark.parametrize(
    "damage",
    [lambda b: b"garbage", lambda b: b[: len(b) // 2], lambda b: b[:20], lambda b: b""],
    ids=["garbage", "truncated-data", "truncated-header", "empty"],
)
def test_corrupted_entry_is_recomputed(tmp_path, caplog, damage):
    cache = ResultCache(tmp_path)
    key = content_key(x=1)
    cache.get_or_compute(key, lambda: np.arange(300))
    entry = tmp_path / f"{key}.npy"
    entry.write_bytes(damage(entry.read_bytes()))
    assert cache.get_or_compute(key, lambda: np.arange(300)).tolist() == list(range(300))
    assert "unreadable" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))
    assert np.load(entry).tolist() == list(range(300)), "the recomputed entry replaced the damaged one"


def test_key_changes_with_every_part(monkeypatch):
    parts = {
        "model": "fingerprint-a",
        "data": "data-hash-a",
        "decoding": {"greedy": True, "max_new_tokens": 256, "n_latent": 6},
        "spec": {"kind": "ablation", "heads": ["L0H1"]},
    }
    key = content_key(**parts)
    changed = {
        "model": "fingerprint-b",
        "data": "data-hash-b",
        "decoding": {"greedy": True, "max_new_tokens": 255, "n_latent": 6},
        "spec": {"kind": "ablation", "heads": ["L0H1"], "mode": "mean"},
    }
    for part, value in changed.items():
        assert content_key(**{**parts, part: value}) != key, part
    monkeypatch.setattr(cache_module, "CACHE_VERSION", cache_module.CACHE_VERSION + 1)
    assert content_key(**parts) != key, "a new cache version never reads old entries"


def test_experiment_keys_cover_weights_data_and_decoding(random_codi):
    problems = synthetic_split("test")[:8]
    run = ModelRun(random_codi, problems, [], ResultCache(None))
    key = run.key(kind="baseline")
    assert ModelRun(random_codi, problems, [], ResultCache(None)).key(kind="baseline") == key
    assert ModelRun(random_codi, problems[:7], [], ResultCache(None)).key(kind="baseline") != key
    assert run.key(kind="ablation") != key
    other = copy.deepcopy(random_codi)
    with torch.no_grad():
        next(other.prj.parameters()).view(-1)[0] += 1e-3
    assert ModelRun(other, problems, [], ResultCache(None)).key(kind="baseline") != key
    other = copy.deepcopy(random_codi)
    other.n_latent += 1
    assert ModelRun(other, problems, [], ResultCache(None)).key(kind="baseline") != key
    on_gpu = ModelRun(random_codi, problems, [], ResultCache(None))
    assert on_gpu.decoding["device"] == "cpu"
    with mock.patch.object(type(random_codi), "device", new_callable=mock.PropertyMock) as device:
        device.return_value = torch.device("cuda", 0)
        assert on_gpu.key(kind="baseline") != key, "CPU and GPU results never share an entry"


# A child process whose write of the entry stops half-way (np.save patched to hang after half the
# bytes) until the test SIGKILLs it.
_KILLED_WRITER = """
import io, sys, time
from pathlib import Path
import numpy as np
from harness.runtime.cache import ResultCache

directory, key, marker = sys.argv[1:]
real_save = np.save

def half_then_hang(f, value, allow_pickle=False):
    buf = io.BytesIO()
    real_save(buf, value, allow_pickle=allow_pickle)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    Path(marker).touch()
    time.sleep(120)

np.save = half_then_hang
ResultCache(directory).get_or_compute(key, lambda: np.arange(200_000))
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_writer_killed_mid_write_leaves_no_entry(tmp_path):
    key, marker = content_key(x="killed"), tmp_path / "writing"
    directory = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(directory), key, str(marker)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(marker, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (directory / f"{key}.npy").exists()
    assert [p.stat().st_size > 0 for p in directory.glob(f"{key}.*.tmp")] == [True], "the partial write happened"
    calls = []
    cache = ResultCache(directory)
    value = cache.get_or_compute(key, lambda: calls.append(1) or np.arange(200_000))
    assert calls == [1] and np.array_equal(value, np.arange(200_000))
    assert not list(directory.glob("*.tmp")), "the killed writer's temporary file is cleaned up"
    assert np.array_equal(ResultCache(directory).get_or_compute(key, lambda: np.zeros(1)), np.arange(200_000))


# Two processes released at once on the same key; the computation records each call in a file.
_RACER = """
import sys, time
from pathlib import Path
import numpy as np
from harness.runtime.cache import ResultCache

directory, key, calls, ready, go = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)

def compute():
    with open(calls, "a") as f:
        f.write("computed\\n")
    time.sleep(1.0)
    return np.arange(1000)

print(int(ResultCache(directory).get_or_compute(key, compute).sum()))
"""


def test_concurrent_processes_compute_an_entry_once(tmp_path):
    key, calls, go = content_key(x="race"), tmp_path / "calls.txt", tmp_path / "go"
    directory = tmp_path / "cache"
    procs = []
    for i in range(2):
        ready = tmp_path / f"ready-{i}"
        args = [sys.executable, "-c", _RACER, str(directory), key, str(calls), str(ready), str(go)]
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((proc, ready))
    for proc, ready in procs:
        _wait_for(ready, proc)
    go.touch()
    outputs = [proc.communicate(timeout=120) for proc, _ in procs]
    assert [(proc.returncode, out.strip()) for (proc, _), (out, _) in zip(procs, outputs)] == [(0, "499500")] * 2
    assert calls.read_text().splitlines() == ["computed"]
    assert [p.name for p in directory.glob("*.npy")] == [f"{key}.npy"] and not list(directory.glob("*.tmp"))
    assert np.array_equal(np.load(directory / f"{key}.npy"), np.arange(1000))


def test_without_a_directory_each_key_is_computed_once_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache, calls = ResultCache(None), []

    def compute():
        calls.append(1)
        return np.ones(2)

    first = cache.get_or_compute("k", compute)
    first[0] = 5.0  # a caller's change does not reach the stored entry
    assert cache.get_or_compute("k", compute).tolist() == [1.0, 1.0] and "k" in cache
    assert (len(calls), cache.misses, cache.hits) == (1, 1, 1) and "j" not in cache
    assert not list(tmp_path.iterdir()), "nothing written to disk"


@pytest.mark.parametrize(
    "spec",
    [
        AblateHeads(("L1H2",), ("latent",), "mean"),
        PatchThoughts(("CT2",), "mean"),
        PatchPath("CT1", ("answer",), "mean"),
        AblateHeads(("L0H3",), ("CT1",), "zero") + PatchThoughts(("CT4",), "mean"),
    ],
    ids=["heads", "thought", "path", "composed"],
)
def test_a_mean_condition_is_keyed_by_the_discovery_split_it_averages(load_model, tmp_path, spec):
    """Same test problems, another discovery split: a mean-mode condition is computed again (its
    values differ), where a zero-mode one is read from the cache."""
    test, cache = synthetic_split("test")[:12], ResultCache(tmp_path)
    first, second = (ModelRun(load_model("tiny-gpt2"), test, split, cache, requested_batch_size=12)
                     for split in (synthetic_split("discovery")[:10], synthetic_split("discovery")[10:20]))  # fmt: skip
    a, b = first.answer_logprobs(spec), second.answer_logprobs(spec)
    assert second._computed, "the second discovery split's means were computed, not read"
    assert np.abs(a - b).max() > 1e-6
    zero = AblateHeads(("L1H2",), ("latent",), "zero")
    first.answer_logprobs(zero)
    computed = len(second._computed)
    second.answer_logprobs(zero)
    assert len(second._computed) == computed, "a zero ablation reads nothing from the discovery split: shared"
