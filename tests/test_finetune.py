"""Recovery: seeded windows, LoRA merge equivalence, loss going down (LoRA and full), configs, CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

from conftest import compose_job, tiny_model, tokens
from prune_lab.core.adapter import layer_shapes
from prune_lab.data import WikiVital
from prune_lab.errors import PruneLabError
from prune_lab.finetune import Full, LoRA, WindowSampler
from prune_lab.model import RandomModel
from prune_lab.core.plan import PruningPlan
from prune_lab.core.executor import apply_plan
from prune_lab.core.adapter import DECODER_LINEARS

PLAN = PruningPlan(attn={0: [1]}, mlp={1: list(range(12)), 2: [0, 1, 2]})
SMALL = dict(batch_size=4, seq_len=32, warmup_steps=2)


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    """~50k tokens of real text (the lab tokenizer on the start of wiki-vital train)."""
    tokenizer = RandomModel().load_tokenizer()
    return tokenizer(WikiVital().text("train")[:200_000], return_tensors="pt").input_ids[0]


@pytest.fixture(scope="module")
def held_out(stream) -> torch.Tensor:
    return stream[-8 * 32:].view(8, 32)


def pruned_tiny(arch: str = "llama"):
    return apply_plan(tiny_model(arch, layers=3), PLAN)


def loss_on(model, batch) -> float:
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def test_window_sampler_is_seeded_contiguous_and_shuffles_each_epoch():
    stream = torch.arange(1000)
    sampler = WindowSampler(stream, seq_len=10, batch_size=4, seed=0)
    assert sampler.steps_per_epoch == 24
    first = [b for _, b in zip(range(24), sampler)]
    again = [b for _, b in zip(range(24), WindowSampler(stream, 10, 4, seed=0))]
    other = [b for _, b in zip(range(24), WindowSampler(stream, 10, 4, seed=1))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    windows = torch.cat(first)
    assert windows.shape == (96, 10) and bool((windows.diff(dim=1) == 1).all())
    assert len(set(windows[:, 0].tolist())) == 96          # one epoch: no window twice
    assert len(set((windows[:, 0] % 10).tolist())) == 1    # cut at one random offset


def test_window_sampler_refuses_a_too_short_split():
    with pytest.raises(PruneLabError, match="too few"):
        WindowSampler(torch.arange(100), seq_len=32, batch_size=4, seed=0)


def test_lora_merge_gives_the_adapted_logits_in_a_plain_model(arch):
    model = pruned_tiny(arch)
    shapes = layer_shapes(model)
    lora = LoRA(target_modules=DECODER_LINEARS, dropout=0.0)
    adapted = lora.wrap(model)
    torch.manual_seed(1)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)    # B starts at zero: make the adapters matter
    x = tokens()
    with torch.no_grad():
        before_merge = adapted(input_ids=x).logits
    lora.unwrap(adapted, model)
    with torch.no_grad():
        merged = model(input_ids=x).logits
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert layer_shapes(model) == shapes
    assert (before_merge - merged).abs().max().item() < 1e-4
    assert (merged - tiny_model(arch, layers=3)(x).logits).abs().max().item() > 1e-2


def test_lora_steps_lower_the_loss_and_write_the_curve(stream, held_out, tmp_path):
    model = pruned_tiny()
    with torch.no_grad():   # a 0.02-std random head keeps every logit near 0, so no adapter could matter
        model.lm_head.weight *= 10
    before = loss_on(model, held_out)
    out = LoRA(r=8, alpha=16, dropout=0.0, lr=1e-2, max_steps=30, target_modules=DECODER_LINEARS,
               **SMALL)(model, None, stream, seed=0, run_dir=tmp_path)
    after = loss_on(model, held_out)
    assert out["steps"] == 30 and out["tokens"] == 30 * 4 * 32
    assert out["final_loss"] < out["first_loss"] - 0.8 and after < before - 0.8
    assert out["trainable_params"] == sum(8 * (m.in_features + m.out_features) for n, m in model.named_modules()
                                          if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DECODER_LINEARS)
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and len(rows) == 31
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_training_is_deterministic_per_seed(stream):
    runs = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        model = pruned_tiny()
        LoRA(lr=1e-2, max_steps=3, target_modules=["q_proj", "down_proj"], **SMALL)(model, None, stream, seed=seed)
        runs[key] = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(runs["a"], runs["b"]) and not torch.equal(runs["a"], runs["c"])


def test_full_finetune_lowers_the_loss(stream, held_out):
    model = pruned_tiny("qwen2")
    before = loss_on(model, held_out)
    out = Full(lr=3e-3, max_steps=30, **SMALL)(model, None, stream, seed=0)
    assert out["method"] == "full" and out["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert loss_on(model, held_out) < before - 0.5


def test_epochs_set_the_number_of_steps(stream):
    out = Full(lr=1e-4, epochs=1, **SMALL)(pruned_tiny(), None, stream[:40 * 32 * 4], seed=0)
    assert out["steps"] == WindowSampler(stream[:40 * 32 * 4], 32, 4, 0).steps_per_epoch == 39


def test_unknown_lora_target_is_one_clear_line(stream):
    lora = LoRA(target_modules=["q_proj", "w_in"], **SMALL)
    with pytest.raises(PruneLabError, match="w_in") as err:
        lora(pruned_tiny(), None, stream)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [dict(r=0), dict(lr=0.0), dict(dropout=1.0), dict(max_steps=0),
                                 dict(epochs=0), dict(target_modules=[])])
def test_bad_finetune_settings_fail_early(bad):
    kwargs = {"target_modules": DECODER_LINEARS, **bad}
    with pytest.raises(PruneLabError):
        LoRA(**kwargs)


def test_configs_compose_and_sweep_over_lora_rank():
    lora = instantiate(compose_job("finetune=lora").finetune)
    assert isinstance(lora, LoRA) and lora.r == 8 and lora.target_modules is None   # the architecture's
    assert isinstance(instantiate(compose_job("finetune=full").finetune), Full)
    sweep = OverridesParser.create().parse_overrides(["finetune.r=8,16"])[0]
    ranks = list(sweep.sweep_iterator())
    assert sweep.is_sweep_override() and ranks == [8, 16]
    assert [instantiate(compose_job("finetune=lora", f"finetune.r={r}").finetune).r for r in ranks] == [8, 16]
    with pytest.raises(Exception, match="finetune.r"):
        compose_job("finetune=lora", "finetune.r=abc")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_lora_and_reload_on_cuda(stream, tmp_path):
    from prune_lab.artifacts.checkpoint import load_pruned, save_pruned
    model = pruned_tiny().to("cuda")
    LoRA(lr=1e-2, max_steps=5, target_modules=DECODER_LINEARS, **SMALL)(model, None, stream, seed=0)
    assert model.device.type == "cuda"
    save_pruned(model, None, tmp_path / "ckpt")
    reloaded = load_pruned(tmp_path / "ckpt", device="cuda")
    x = tokens().cuda()
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


@pytest.mark.lab
def test_lora_recovers_pruned_lab_llama(lab_model):
    """The real case: half of lab-llama's MLP channels gone, 12 LoRA steps, held-out loss goes down."""
    model, tokenizer = lab_model
    views = layer_shapes(model)
    apply_plan(model, PruningPlan(mlp={i: list(range(0, v["mlp_width"], 2)) for i, v in enumerate(views)}))
    train = tokenizer(WikiVital().text("train")[:400_000], return_tensors="pt").input_ids[0]
    test = tokenizer(WikiVital().text("test")[:60_000], return_tensors="pt").input_ids[0]
    held = test[:8 * 256].view(8, 256)
    before = loss_on(model, held)
    out = LoRA(lr=2e-3, max_steps=12, batch_size=4, seq_len=128, warmup_steps=2,
               target_modules=DECODER_LINEARS)(model, tokenizer, train, seed=0)
    assert loss_on(model, held) < before - 0.2, out     # measured: 4.82 -> 4.51 nats
