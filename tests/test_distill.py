"""finetune=distill: the loss against a slow reference, KL 0 for a student equal to its teacher, gradients only
into what is trained, the teacher is the dense model (not the pruned one), masks kept, a CLI job lowers the KL."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from conftest import lively, run_cli, text_job, tiny_model, tiny_overrides, tokens, write_small_corpus
from prune_lab import load_pruned
from prune_lab.artifacts.compression import load_compression
from prune_lab.core.adapter import layer_views, view_linears
from prune_lab.core.executor import apply_plan
from prune_lab.core.plan import PruningPlan
from prune_lab.errors import PruneLabError
from prune_lab.finetune import Distill, LoRA, WindowSampler
from prune_lab.finetune import kd
from prune_lab.recipes import run

SMALL = dict(batch_size=2, seq_len=16, warmup_steps=0)


def job(tmp_path, *overrides):
    return text_job(tmp_path, "output.plots=false", *overrides)


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def slow_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, support=None) -> float:
    """Position by position, token by token, in float64 Python arithmetic."""
    total, n = 0.0, 0
    s, t = student.double().reshape(-1, student.shape[-1]), teacher.double().reshape(-1, teacher.shape[-1])
    for pos in range(s.shape[0]):
        ids = range(s.shape[1]) if support is None else support.reshape(-1, support.shape[-1])[pos].tolist()
        zt = sum(math.exp(t[pos, i].item() / temperature) for i in ids)
        zs = sum(math.exp(s[pos, i].item() / temperature) for i in ids)
        for i in ids:
            p = math.exp(t[pos, i].item() / temperature) / zt
            q = math.exp(s[pos, i].item() / temperature) / zs
            total += p * math.log(p / q)
        n += 1
    return temperature ** 2 * total / n


def test_kl_and_topk_kl_equal_a_slow_reference():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=gen) * 2, torch.randn(2, 3, 11, generator=gen) * 2
    for temperature in (1.0, 2.5):
        assert kd.kl(s, t, temperature).item() == pytest.approx(slow_kl(s, t, temperature), rel=1e-5)
        values, indices = t.topk(4, dim=-1)
        got = kd.kl_topk(s, values, indices.int(), temperature).item()
        assert got == pytest.approx(slow_kl(s, t, temperature, support=indices), rel=1e-5)
        assert kd.kl_topk(s, *t.topk(11, dim=-1), temperature).item() == pytest.approx(
            kd.kl(s, t, temperature).item(), rel=1e-5)        # k = V: the full KL
    assert kd.layer_map(5, [1, 3]) == {0: 0, 2: 1, 4: 2}


def test_the_distill_loss_equals_its_definition_on_a_depth_pruned_student():
    """T²·KL + ce_weight·CE + hidden_weight·MSE over the layers both have: dense layer 1 is gone, so dense
    hidden_layers [0, 1, 2] compare dense 0 and 2 with the student's 0 and 1."""
    dense = lively(tiny_model("llama", layers=4))       # O(1) logits: a KL far above fp32 rounding
    student = apply_plan(copy.deepcopy(dense), PruningPlan(layers=[1], mlp={0: [0, 5, 7]}))
    distill = Distill(mode="full", temperature=2.0, ce_weight=0.5, hidden_weight=0.3, hidden_layers=[0, 1, 2],
                      **SMALL)
    distill.check_model(dense)
    teacher = distill.teacher(dense, torch.arange(500), seed=0)
    assert teacher.model is not dense and teacher.topk is None
    batch = tokens(2, 16)
    with distill.session(student, teacher=teacher, removed_layers=[1]):
        loss, parts = distill.loss(student, batch, 0)
    assert distill.hidden_layers_used == [0, 2]
    with torch.no_grad():
        s = student(input_ids=batch, output_hidden_states=True)
        t = dense(input_ids=batch, output_hidden_states=True)
        logp_s = s.logits[:, :-1].double().log_softmax(-1)
        ce = -logp_s.gather(-1, batch[:, 1:, None]).mean().item()
        mse = ((s.hidden_states[1] - t.hidden_states[1]).pow(2).mean().item()
               + (s.hidden_states[2] - t.hidden_states[3]).pow(2).mean().item()) / 2
    reference = slow_kl(s.logits, t.logits, 2.0) + 0.5 * ce + 0.3 * mse
    assert parts["kl"] == pytest.approx(slow_kl(s.logits, t.logits, 2.0), rel=1e-4)
    assert parts["ce"] == pytest.approx(ce, rel=1e-4) and parts["hidden_mse"] == pytest.approx(mse, rel=1e-4)
    assert loss.item() == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("topk", [None, 8])
def test_a_student_equal_to_its_teacher_has_zero_kl(topk):
    model = tiny_model("llama")
    stream = torch.randint(0, 8192, (400,), generator=torch.Generator().manual_seed(1))
    distill = Distill(teacher_topk=topk, hidden_weight=0.0 if topk else 1.0, max_steps=3, **SMALL)
    teacher = distill.teacher(model, stream, seed=0)
    assert (teacher.model is None) == (topk is not None)       # top-k precomputed: no copy of the model
    sampler, steps = distill.sampler(stream, 0)
    with distill.session(model, teacher=teacher):
        for step, batch in zip(range(steps), sampler):
            loss, parts = distill.loss(model, batch, step)
            assert abs(parts["kl"]) < 1e-6 and parts.get("hidden_mse", 0.0) < 1e-10 and abs(loss.item()) < 1e-6


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradients_flow_only_into_the_trained_parameters(mode):
    dense = tiny_model("llama")
    student = apply_plan(copy.deepcopy(dense), PruningPlan(mlp={1: list(range(10))}))
    distill = Distill(mode=mode, dropout=0.0, hidden_weight=1.0, hidden_layers=[1], **SMALL)
    teacher = distill.teacher(dense, torch.arange(500), seed=0)
    trained = distill.wrap(student)
    if mode == "lora":
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.05)     # B starts at 0: give lora_A a gradient too
    with distill.session(student, teacher=teacher):
        loss, _ = distill.loss(trained, tokens(2, 16), 0)
        loss.backward()
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(p.grad is None for p in dense.parameters())
    for name, p in trained.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    lora = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in lora) if mode == "lora" else len(lora) == len(list(student.parameters()))


@pytest.mark.parametrize("topk", [None, 8])
def test_teacher_correction_fine_tunes_a_copy_of_the_dense_model(topk):
    """teacher_correction_steps=4: the teacher is the dense model after exactly the CE-LoRA run a reference
    LoRA trainer gives (seed + 1); the dense model itself, which the recipe prunes, is left as loaded."""
    dense = lively(tiny_model("llama"))
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    stream = torch.randint(0, 8192, (600,), generator=torch.Generator().manual_seed(2))
    distill = Distill(teacher_correction_steps=4, teacher_topk=topk, dropout=0.0, max_steps=2, **SMALL)
    teacher = distill.teacher(dense, stream, seed=0)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())
    reference = copy.deepcopy(dense)
    record = LoRA(dropout=0.0, lr=2e-3, max_steps=4, **SMALL)(reference, None, stream, seed=1)
    assert teacher.correction["steps"] == 4 and teacher.correction["first_loss"] == pytest.approx(record["first_loss"])
    if topk is None:
        ref, got = reference.state_dict(), teacher.model.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
        assert any(not torch.equal(got[k], before[k]) for k in before)
        student = copy.deepcopy(dense)
        out = distill(student, None, stream, seed=0, teacher=teacher)
        assert out["teacher_correction"]["steps"] == 4 and out["steps"] == 2
    else:
        batch = teacher.batches[0]
        with torch.no_grad():
            values, _ = reference(input_ids=batch).logits.topk(topk, dim=-1)
        assert torch.allclose(teacher.topk[0][0], values)


def test_bad_distill_settings_are_one_line():
    for bad in (dict(mode="qlora"), dict(temperature=0.0), dict(ce_weight=-1.0), dict(teacher_topk=0),
                dict(hidden_layers=[-1]), dict(teacher_correction_steps=-1)):
        with pytest.raises(PruneLabError) as err:
            Distill(**bad)
        assert "\n" not in str(err.value)
    with pytest.raises(PruneLabError, match="hidden_layers"):
        Distill(hidden_layers=[3]).check_model(tiny_model("llama", layers=3))
    with pytest.raises(PruneLabError, match="teacher_topk"):
        Distill(teacher_topk=10_000).check_model(tiny_model("llama"))


def test_the_teacher_is_the_dense_model_not_the_pruned_one(tmp_path):
    """A structured job with a removed layer: the first step's KL (LoRA B = 0, no dropout: the student is
    the pruned model) equals KL(dense ‖ pruned model before recovery) on the sampler's first batch."""
    cfg = job(tmp_path, "allocator=depth", "allocator.n_layers=1", "finetune=distill", "finetune.max_steps=2",
              "finetune.dropout=0", "finetune.batch_size=2", "finetune.seq_len=32", "finetune.hidden_weight=0.5",
              "output.save_model=true")
    run(cfg, tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "ok" and m["plan"]["layers_removed"] and m["finetune"]["hidden_layers_used"]
    dense = tiny_model("llama")                       # model=random's weights, by its seed
    pruned = load_pruned(tmp_path / "run" / "model_pruned")
    from prune_lab.model import RandomModel
    stream = RandomModel().load_tokenizer()((tmp_path / "train.txt").read_text(), return_tensors="pt").input_ids[0]
    batch = next(iter(WindowSampler(stream, 32, 2, seed=0)))
    with torch.no_grad():
        expected = kd.kl(pruned(input_ids=batch).logits, dense(input_ids=batch).logits, 1.0).item()
    assert expected > 1e-3
    assert m["finetune"]["first_kl"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_distill_keeps_the_masks_and_the_grid_of_sparsegpt(tmp_path, mode):
    cfg = job(tmp_path, "method=sparsegpt", "method.sparsity=0.5", "method.blocksize=16", "quant=uniform",
              "quant.bits=3", "finetune=distill", f"finetune.mode={mode}", "finetune.max_steps=3",
              "finetune.lr=1e-2", "finetune.seq_len=32", "finetune.batch_size=2", "finetune.teacher_topk=16",
              "output.save_model=true")
    run(cfg, tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "ok" and m["finetune"]["teacher_precomputed"] and m["recovered"] != m["pruned"]
    masks, bits, _ = load_compression(tmp_path / "run" / "model")
    model = load_pruned(tmp_path / "run" / "model")
    for v in layer_views(model):
        for p, lin in view_linears(v).items():
            mask = masks[(v.index, p)]
            assert (lin.weight[~mask] == 0).all() and mask.float().mean() == 0.5
            assert all(len(torch.unique(row)) <= 8 for row in lin.weight)


def test_a_cli_distill_job_lowers_the_kl(tmp_path):
    """A tiny model with O(1) logits (lively, saved as a checkpoint), half of it pruned, 30 distill steps."""
    from prune_lab.artifacts.checkpoint import save_pruned
    from prune_lab.model import RandomModel
    save_pruned(lively(tiny_model("llama")), RandomModel().load_tokenizer(), tmp_path / "lively")
    corpus = write_small_corpus(tmp_path)
    shrink = [o for o in tiny_overrides("llama") if not o.startswith("model")]
    proc = run_cli(*shrink, "model=pruned", f"model.path={tmp_path}/lively", "model.device=cpu", "data=text",
                   f"data.train={corpus}/train.txt", f"data.test={corpus}/test.txt", "output.plots=false",
                   "allocator.ratio=0.5", "finetune=distill", "finetune.mode=full", "finetune.max_steps=40", "finetune.lr=3e-3",
                   "finetune.batch_size=2", "finetune.seq_len=32", "finetune.warmup_steps=2",
                   "finetune.teacher_topk=64", "finetune.temperature=2.0",
                   run_dir=tmp_path / "run", cache=tmp_path / "cache", check=True)
    m = metrics(tmp_path / "run")
    f = m["finetune"]
    assert m["status"] == "ok" and f["method"] == "distill" and f["steps"] == 40, proc.stderr[-2000:]
    assert f["teacher_precomputed"] and "teacher" in m["timings_s"]
    assert f["final_kl"] < 0.8 * f["first_kl"], f
