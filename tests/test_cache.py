import numpy as np

from harness.cache import ResultCache, content_key


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


def test_corrupted_entry_is_recomputed(tmp_path, caplog):
    cache = ResultCache(tmp_path)
    key = content_key(x=1)
    cache.get_or_compute(key, lambda: np.arange(3))
    (tmp_path / f"{key}.npy").write_bytes(b"garbage")
    assert cache.get_or_compute(key, lambda: np.arange(3)).tolist() == [0, 1, 2]
    assert "unreadable" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))


def test_disabled_cache_always_computes(tmp_path):
    cache = ResultCache(None)
    assert cache.get_or_compute("k", lambda: np.ones(2)).tolist() == [1.0, 1.0]
    assert cache.misses == 1
