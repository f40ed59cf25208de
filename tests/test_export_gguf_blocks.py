"""output.export=gguf of a model with emptied blocks: an attention-free layer is written as llama.cpp's
deci writes it (head_count 0, no attention tensors, its FFN kept); what deci does not compute as
transformers does (a layer without MLP, layer 0 without attention) is refused with one line."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, lively
from prune_lab.core.adapter import layer_views
from prune_lab.core.executor import apply_plan
from prune_lab.core.plan import PruningPlan
from prune_lab.errors import PruneLabError
from prune_lab.model import RandomModel

gguf = pytest.importorskip("gguf", reason="the gguf package (extra `real`) is not installed")
from prune_lab.artifacts.gguf_write import export_gguf, layout, permute_rows  # noqa: E402


def emptied(arch: str, plan: PruningPlan):
    shape = dict(TINY[arch], num_hidden_layers=4, intermediate_size=48)
    return apply_plan(lively(RandomModel(**shape, device="cpu").build()), plan)


@pytest.fixture(scope="module")
def tokenizer():
    return RandomModel(device="cpu").load_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_attention_free_layer_is_a_deci_layer_without_attention_tensors(arch, tokenizer, tmp_path):
    model = emptied(arch, PruningPlan(attn={0: [1]}, mlp={1: [2, 3]}, attn_blocks=[2]))
    views = layer_views(model)
    info = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert info["architecture"] == "deci" and info["head_count"][2] == info["head_count_kv"][2] == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta["deci.attention.head_count"] == [v.attn.num_heads for v in views]
    assert meta["deci.attention.head_count"][2] == 0 and meta["deci.attention.head_count_kv"][2] == 0
    assert meta["deci.feed_forward_length"] == [v.mlp.width for v in views]
    tensors = {t.name: t for t in reader.tensors}
    assert not [n for n in tensors if n.startswith("blk.2.attn_")]           # no attn_norm, q, k, v, o
    assert {"blk.2.ffn_norm.weight", "blk.2.ffn_up.weight", "blk.2.ffn_down.weight"} <= set(tensors)
    for i in (1, 3):
        assert f"blk.{i}.attn_norm.weight" in tensors
        got = torch.from_numpy(tensors[f"blk.{i}.attn_q.weight"].data.astype("float32").copy())
        assert torch.equal(got, permute_rows(views[i].attn.q.weight.detach(), views[i].attn.num_heads))
    got = torch.from_numpy(tensors["blk.2.ffn_down.weight"].data.astype("float32").copy())
    assert torch.equal(got, views[2].mlp.down.weight.detach())


@pytest.mark.parametrize("plan,line", [
    (PruningPlan(mlp_blocks=[1]), r"layers \[1\] have no MLP, and llama.cpp's deci drops such a layer's attention"),
    (PruningPlan(attn_blocks=[0]), "layer 0 has no attention, and llama.cpp reads the head size"),
])
def test_what_deci_does_not_compute_is_refused_with_one_line(plan, line, tokenizer, tmp_path):
    model = emptied("llama", plan)
    with pytest.raises(PruneLabError, match=line):
        layout(model)
    with pytest.raises(PruneLabError, match=line):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()
