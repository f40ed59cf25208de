"""Datasets, calibration batches and the perplexity protocol."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED, needs_shared, tiny_model, tokens
from prune_lab.data import Calibration, HubText, LocalText, WikiVital, load_named
from prune_lab.errors import DataUnavailable, PruneLabError
from prune_lab.eval.ppl import perplexities, perplexity, windows


def test_wiki_vital_is_bundled_and_split():
    ds = WikiVital()
    test = ds.text("test")
    assert test.lstrip().startswith("= ") and 200_000 < len(test) < 300_000
    assert len(ds.text("train")) > 10 * len(test)
    with pytest.raises(PruneLabError, match="unknown split"):
        ds.text("dev")


@needs_shared()
def test_bundled_wiki_vital_matches_shared_copy():
    for split in ("train", "valid", "test"):
        assert WikiVital().text(split) == (SHARED / "data/wiki-vital-en" / f"{split}.txt").read_text()


def test_local_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    ds = LocalText(train=str(tmp_path / "a.txt"))
    assert ds.text("train") == "hello world"
    with pytest.raises(PruneLabError, match="no file for split 'test'"):
        ds.text("test")
    with pytest.raises(PruneLabError, match="does not exist"):
        LocalText(test=str(tmp_path / "missing.txt")).text("test")


def test_hub_dataset_unreachable_offline_fails_with_one_line():
    ds = load_named("wikitext2")
    assert isinstance(ds, HubText)
    with pytest.raises(DataUnavailable, match="unreachable") as err:
        ds.text("test")
    assert "\n" not in str(err.value) and "data=text" in str(err.value)


def test_named_datasets_are_composed_from_the_configs():
    assert isinstance(load_named("wiki_vital"), WikiVital)
    ptb = load_named("ptb")
    assert (ptb.path, ptb.text_field, ptb.separator) == ("ptb_text_only", "sentence", " ")
    assert ptb.splits == {"train": "train", "valid": "validation", "test": "test"}
    with pytest.raises(PruneLabError, match="unknown dataset 'nope': choose one of .*wikitext2"):
        load_named("nope")


def test_calibration_is_deterministic_given_the_seed():
    stream = torch.arange(10_000)
    cal = Calibration(n_samples=10, seq_len=64, batch_size=4)
    a, b, c = cal.batches(stream, 0), cal.batches(stream, 0), cal.batches(stream, 1)
    assert [x.shape for x in a] == [(4, 64), (4, 64), (2, 64)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(torch.equal(w[1:] - w[:-1], torch.ones(63, dtype=w.dtype)) for x in a for w in x)


def test_windows_are_non_overlapping_and_drop_the_remainder():
    w = windows(torch.arange(10), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(torch.arange(10), 3, max_windows=2).shape == (2, 3)


def test_perplexity_matches_a_hand_computation():
    model = tiny_model("llama")
    stream = tokens(1, 101, seed=3)[0]
    # by hand: every window's predicted positions, one NLL each, averaged over all of them
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 100, 20):
            window = stream[start:start + 20]
            logp = F.log_softmax(model(window[None]).logits[0].double(), -1)
            for t in range(19):
                nll -= logp[t, window[t + 1]].item()
                count += 1
    expected = math.exp(nll / count)
    got = perplexity(model, stream, seq_len=20, batch_size=2, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, stream, seq_len=20, batch_size=5, progress=False) == pytest.approx(got, rel=1e-5)


def test_prefix_windows_equal_a_separate_max_windows_evaluation():
    model = tiny_model("llama")
    stream = tokens(1, 20 * 16 + 7, seed=5)[0]               # 16 windows of 20 tokens + a remainder
    got = perplexities(model, stream, seq_len=20, batch_size=4, prefix_windows=[8, 3], progress=False)
    assert list(got) == [None, 8, 3]
    assert got[None] == perplexity(model, stream, seq_len=20, batch_size=4, progress=False)
    assert got[8] == pytest.approx(perplexity(model, stream, 20, 4, max_windows=8, progress=False), rel=1e-9, abs=0)
    # a prefix inside a batch: the same per-window sums (batch composition may move the last ulp)
    assert got[3] == pytest.approx(perplexity(model, stream, 20, 4, max_windows=3, progress=False), rel=1e-6)
    assert got[8] != got[None] and got[3] != got[8]
    with pytest.raises(PruneLabError, match="prefix_windows: 17 windows asked"):
        perplexities(model, stream, seq_len=20, batch_size=4, prefix_windows=[17], progress=False)


@pytest.mark.lab
def test_dense_lab_llama_perplexity_is_48_13(lab_model):
    model, tokenizer = lab_model
    stream = tokenizer(WikiVital().text("test"), return_tensors="pt").input_ids[0]
    assert round(perplexity(model, stream, seq_len=256, batch_size=16, progress=False), 2) == 48.13
