"""Score cache: content-hash keys, checksummed entries, concurrent writers, unwritable dirs, NaN."""
from __future__ import annotations

import json
import logging
import multiprocessing

import pytest
import torch

from conftest import text_job, tiny_model, write_small_corpus
from prune_lab.cache import scores as cache
from prune_lab.cache.scores import ScoreCache, model_fingerprint, tokens_fingerprint
from prune_lab.recipes import run


@pytest.fixture
def text_files(tmp_path):
    """Small local train/test splits (a slice of the bundled corpus), so each run tokenises little."""
    write_small_corpus(tmp_path)
    return tmp_path


def job(tmp_path, text_files, *extra):
    return text_job(text_files, "output.plots=false", *extra)


def scores_reused(tmp_path, text_files, name, *extra) -> dict:
    run(job(tmp_path, text_files, *extra), tmp_path / name)
    return json.loads((tmp_path / name / "metrics.json").read_text())["scores"]


def test_scores_hit_then_invalidated_by_calibration_seed_and_criterion(tmp_path, text_files):
    cache._MEMORY.clear()
    assert scores_reused(tmp_path, text_files, "first") == {"reused": False, "layer_reused": False}
    assert scores_reused(tmp_path, text_files, "again") == {"reused": True, "layer_reused": True}
    cache._MEMORY.clear()                       # a new process: the hit now comes from disk
    assert scores_reused(tmp_path, text_files, "disk") == {"reused": True, "layer_reused": True}
    assert len(list((tmp_path / "cache" / "scores").glob("*.safetensors"))) == 2   # unit + layer

    # Calibration data changes both keys; a new criterion only the unit-score key.
    assert scores_reused(tmp_path, text_files, "n6", "calibration.n_samples=6") == \
        {"reused": False, "layer_reused": False}
    assert scores_reused(tmp_path, text_files, "seed1", "seed=1") == {"reused": False, "layer_reused": False}
    assert scores_reused(tmp_path, text_files, "wanda", "importance=wanda") == \
        {"reused": False, "layer_reused": True}
    assert scores_reused(tmp_path, text_files, "taylor2", "importance=taylor_2nd") == \
        {"reused": False, "layer_reused": True}
    # Same tokens, other batching: taylor_2nd's E[g^2] depends on it, so the key must too.
    assert scores_reused(tmp_path, text_files, "taylor2_b4", "importance=taylor_2nd",
                         "calibration.batch_size=4") == {"reused": False, "layer_reused": False}
    assert scores_reused(tmp_path, text_files, "off", "cache.enabled=false") == \
        {"reused": False, "layer_reused": False}


def test_reused_scores_equal_computed_ones(tmp_path, text_files):
    cache._MEMORY.clear()
    run(job(tmp_path, text_files, "importance=wanda"), tmp_path / "a")
    run(job(tmp_path, text_files, "importance=wanda"), tmp_path / "b")
    run(job(tmp_path, text_files, "importance=wanda", "cache.enabled=false"), tmp_path / "c")
    from safetensors.torch import load_file
    a, b, c = (load_file(str(tmp_path / d / "scores.safetensors")) for d in "abc")
    assert a.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.allclose(a[k], c[k]) for k in a)
    plans = [(tmp_path / d / "plan.csv").read_text() for d in "abc"]
    assert plans[0] == plans[1] == plans[2]


def test_model_fingerprint_sees_every_weight_and_the_dtype():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(tiny_model(seed=1))
    with torch.no_grad():
        b.model.layers[2].mlp.down_proj.weight[0, 0] += 1e-4
    fp32 = model_fingerprint(a)
    assert fp32 != model_fingerprint(b)
    assert fp32 != model_fingerprint(a.to(torch.bfloat16))      # .to() converts in place


def test_tokens_fingerprint_sees_tokens_and_batching():
    tokens = torch.arange(128).view(4, 32)
    assert tokens_fingerprint(list(tokens.split(2))) == tokens_fingerprint(list(tokens.clone().split(2)))
    assert tokens_fingerprint(list(tokens.split(2))) != tokens_fingerprint(list(tokens.split(4)))
    other = tokens.clone()
    other[3, 31] += 1
    assert tokens_fingerprint(list(tokens.split(2))) != tokens_fingerprint(list(other.split(2)))


def permute_mlp(model, layer: int, seed: int = 0) -> None:
    """Permute one layer's MLP channels: the same function, so every sum and norm is unchanged."""
    mlp = model.model.layers[layer].mlp
    perm = torch.randperm(mlp.gate_proj.out_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])


def test_model_fingerprint_sees_a_permutation_of_mlp_channels():
    a, b = tiny_model(), tiny_model()
    permute_mlp(b, layer=1)
    x = torch.randint(0, 8192, (1, 8))
    with torch.no_grad():           # the same function, other weights: scores must not be reused
        assert torch.allclose(a(x).logits, b(x).logits, atol=1e-5)
    assert model_fingerprint(a) != model_fingerprint(b)


def entry(tmp_path) -> "tuple[ScoreCache, str, dict]":
    cache._MEMORY.clear()
    store = ScoreCache(tmp_path / "cache")
    tensors = {"attn.0": torch.arange(4.0), "mlp.0": torch.linspace(0, 1, 4096)}
    store.put("k" * 32, tensors)
    cache._MEMORY.clear()          # what another process sees: the disk entry
    return store, "k" * 32, tensors


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "empty"])
def test_corrupt_or_truncated_entry_warns_and_is_recomputed(tmp_path, caplog, damage):
    store, key, tensors = entry(tmp_path)
    path = store._path(key)
    data = bytearray(path.read_bytes())
    if damage == "flip_a_byte":     # inside the tensor data: safetensors itself cannot notice
        data[-100] ^= 0xFF
    path.write_bytes(bytes(data[: len(data) // 2]) if damage == "truncate" else
                     b"" if damage == "empty" else bytes(data))
    calls = []
    with caplog.at_level(logging.WARNING, logger="prune_lab"):
        scores, reused = store.unit_scores(key, lambda: calls.append(1) or cache.UnitScores.from_tensors(tensors))
    assert (reused, calls) == (False, [1])
    assert any("corrupt or truncated" in r.getMessage() for r in caplog.records)
    cache._MEMORY.clear()           # the recomputed entry replaced the bad one
    assert torch.equal(store.get(key)["mlp.0"], tensors["mlp.0"])


def _hammer(directory, barrier, n, tensors):
    store = ScoreCache(directory)
    barrier.wait()
    for _ in range(n):
        cache._MEMORY.clear()
        store.put("same" * 8, tensors)


def test_concurrent_writers_of_one_key_do_not_crash_each_other(tmp_path):
    ctx = multiprocessing.get_context("fork")      # forked children: no torch import per process
    barrier = ctx.Barrier(4)
    tensors = {f"mlp.{i}": torch.full((8000,), float(i)) for i in range(8)}   # small: no OpenMP in a fork
    procs = [ctx.Process(target=_hammer, args=(tmp_path, barrier, 25, tensors)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    cache._MEMORY.clear()
    assert torch.equal(ScoreCache(tmp_path).get("same" * 8)["mlp.7"], tensors["mlp.7"])
    assert [p.name for p in (tmp_path / "scores").iterdir()] == ["same" * 8 + ".safetensors"]


def test_nan_scores_are_not_cached(tmp_path, caplog):
    cache._MEMORY.clear()
    store = ScoreCache(tmp_path)
    bad = cache.UnitScores([torch.tensor([1.0, float("nan")])], [torch.ones(3)])
    with caplog.at_level(logging.WARNING, logger="prune_lab"):
        _, reused = store.unit_scores("n" * 32, lambda: bad)
    assert reused is False and store.get("n" * 32) is None
    assert not (tmp_path / "scores").exists() or not any((tmp_path / "scores").iterdir())
    assert any("NaN" in r.getMessage() for r in caplog.records)


def test_unwritable_or_full_cache_dir_warns_and_the_job_finishes(tmp_path, text_files, caplog, monkeypatch):
    cache._MEMORY.clear()
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="prune_lab"):
        run(job(tmp_path, text_files, f"cache.dir={blocker}"), tmp_path / "unwritable")
    assert json.loads((tmp_path / "unwritable" / "metrics.json").read_text())["status"] == "ok"
    assert any("not writable" in r.getMessage() for r in caplog.records)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache, "save_file", disk_full)
    cache._MEMORY.clear()
    store = ScoreCache(tmp_path / "full")
    store.put("f" * 32, {"layer": torch.ones(3)})
    assert list((tmp_path / "full" / "scores").iterdir()) == []     # no temp file left behind


def test_a_new_criterion_version_is_a_cache_miss(tmp_path, text_files, monkeypatch):
    """The key holds the criterion's code version: scores of older code are never handed back."""
    from prune_lab.importance.taylor import Taylor
    from prune_lab.layer_importance.base import LayerImportance
    cache._MEMORY.clear()
    taylor = ("importance=taylor",)
    assert scores_reused(tmp_path, text_files, "v1", *taylor) == {"reused": False, "layer_reused": False}
    assert scores_reused(tmp_path, text_files, "v1b", *taylor) == {"reused": True, "layer_reused": True}
    monkeypatch.setattr(Taylor, "version", Taylor.version + 1)
    assert scores_reused(tmp_path, text_files, "v2", *taylor) == {"reused": False, "layer_reused": True}
    assert scores_reused(tmp_path, text_files, "v2b", *taylor) == {"reused": True, "layer_reused": True}
    monkeypatch.setattr(LayerImportance, "version", LayerImportance.version + 1)
    assert scores_reused(tmp_path, text_files, "v3", *taylor) == {"reused": True, "layer_reused": False}
