"""The in-process dense-model memo of a multirun (prune_lab/dense.py)."""
from __future__ import annotations

import torch

from conftest import write_small_corpus
from prune_lab.data import LocalText
from prune_lab.cache.dense import ContentTokenStreams, DenseModels
from prune_lab.model import RandomModel


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


def test_content_token_streams_hit_for_a_reinstantiated_dataset(tmp_path):
    text_files = write_small_corpus(tmp_path)
    loader = RandomModel(device="cpu")
    streams = ContentTokenStreams(loader.load_tokenizer())
    a = streams(LocalText(train=str(text_files / "train.txt")), "train")
    b = streams(LocalText(train=str(text_files / "train.txt")), "train")
    (text_files / "other.txt").write_text("completely different text " * 50, encoding="utf-8")
    c = streams(LocalText(train=str(text_files / "other.txt")), "train")
    assert b is a and not torch.equal(a[: len(c)], c)
