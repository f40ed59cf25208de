"""Score cache (content-hash keys) and the in-process dense-model cache that make sweep trials cheap."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_job, tiny_model, tiny_overrides, write_small_corpus
from prune_lab import cache
from prune_lab.cache import ContentTokenStreams, DenseModels, model_fingerprint, tokens_fingerprint
from prune_lab.data import LocalText
from prune_lab.model import RandomModel
from prune_lab.pipeline import run


@pytest.fixture
def text_files(tmp_path):
    """Small local train/test splits (a slice of the bundled corpus), so each run tokenises little."""
    write_small_corpus(tmp_path)
    return tmp_path


def job(tmp_path, text_files, *extra):
    return compose_job(*tiny_overrides("llama", tmp_path), "data=text", f"data.train={text_files}/train.txt",
                       f"data.test={text_files}/test.txt", "output.plots=false", *extra)


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


def test_dense_models_hand_out_fresh_copies_of_the_loaded_weights():
    loader = RandomModel(num_hidden_layers=2, intermediate_size=32, device="cpu")
    key = {"arch": "llama", "layers": 2}
    dense = DenseModels()
    first, tok1, streams1, reused1 = dense.load(loader, key, keep=True)
    reference = {k: v.clone() for k, v in first.state_dict().items()}
    with torch.no_grad():                       # a job prunes / edits its model in place
        for p in first.parameters():
            p.mul_(0)
    second, tok2, streams2, reused2 = dense.load(loader, key, keep=True)
    assert (reused1, reused2) == (False, True)
    assert second is not first and tok2 is tok1 and streams2 is streams1
    state = second.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert second.lm_head.weight.data_ptr() != first.lm_head.weight.data_ptr()

    third, *_, reused3 = dense.load(loader, {"arch": "llama", "layers": 3}, keep=True)   # new key: reload
    assert reused3 is False and dense.key is not None
    *_, reused4 = dense.load(loader, key, keep=False)
    assert reused4 is False


def test_content_token_streams_hit_for_a_reinstantiated_dataset(text_files):
    loader = RandomModel(device="cpu")
    streams = ContentTokenStreams(loader.load_tokenizer())
    a = streams(LocalText(train=str(text_files / "train.txt")), "train")
    b = streams(LocalText(train=str(text_files / "train.txt")), "train")
    (text_files / "other.txt").write_text("completely different text " * 50, encoding="utf-8")
    c = streams(LocalText(train=str(text_files / "other.txt")), "train")
    assert b is a and not torch.equal(a[: len(c)], c)
