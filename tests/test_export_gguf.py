"""output.export=gguf: every architecture's GGUF read back with the gguf reader holds the pruned model
(metadata arrays, tensor shapes and values, the tokenizer); a uniform export loads back with prune_lab's
model=gguf loader to the same logits; what no llama.cpp architecture expresses is one line before the
work it would waste."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import LAB_MODEL, TINY, compose_job, lively, run_cli, tiny_overrides
from prune_lab.core.adapter import layer_views
from prune_lab.core.executor import apply_plan
from prune_lab.core.plan import PruningPlan
from prune_lab.errors import PruneLabError
from prune_lab.model import RandomModel

gguf = pytest.importorskip("gguf", reason="the gguf package (extra `real`) is not installed")
from prune_lab.artifacts.gguf_write import check_model, export_gguf, permute_rows  # noqa: E402
from prune_lab.recipes import run  # noqa: E402

KV = {"llama": 4, "mistral": 4, "qwen3": 4, "qwen2": 7}
# uniform: one shape everywhere (+ a removed layer); mixed: every layer its own widths, and a removed layer
PLANS = {"uniform": PruningPlan(attn={i: [1] for i in (0, 2, 3)}, mlp={i: [0, 3, 7, 9, 20] for i in (0, 2, 3)},
                               layers=[1]),
         "mixed": PruningPlan(attn={0: [1], 3: [0, 2]}, mlp={0: [5], 2: [0, 4], 3: [1, 2, 3]}, layers=[1])}


def pruned(arch: str, plan: PruningPlan, layers: int = 4, head_dim: int | None = None):
    shape = dict(TINY[arch], num_key_value_heads=KV[arch], num_hidden_layers=layers, intermediate_size=48)
    if head_dim:
        shape["head_dim"] = head_dim
    plan = PruningPlan(attn={i: [g for g in gs if g < KV[arch]] for i, gs in plan.attn.items()},
                       mlp=plan.mlp, layers=plan.layers)
    return apply_plan(lively(RandomModel(**shape, device="cpu").build()), plan)


@pytest.fixture(scope="module")
def tokenizer():
    return RandomModel(device="cpu").load_tokenizer()


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def values(t) -> torch.Tensor:
    """A tensor of the file as float32, in numpy/torch (rows, columns) order."""
    if t.tensor_type.name in ("F32", "F16"):
        return torch.from_numpy(t.data.astype("float32").copy())
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())


@pytest.mark.parametrize("variant", list(PLANS))
def test_every_architecture_round_trips_through_the_gguf_reader(arch, variant, tokenizer, tmp_path):
    model = pruned(arch, PLANS[variant])
    views = layer_views(model)
    if arch == "qwen3" and variant == "mixed":
        with pytest.raises(PruneLabError, match="no q/k norms"):
            export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
        assert not (tmp_path / "m.gguf").exists()
        return
    info = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    expected = {"uniform": {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "qwen3"}[arch],
                "mixed": "deci"}[variant]
    assert info["architecture"] == expected
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    meta = fields(reader)
    a = expected
    heads = [v.attn.num_heads for v in views]
    kv = [v.attn.num_kv_heads for v in views]
    ffn = [v.mlp.width for v in views]
    per_layer = (lambda x: x) if a == "deci" else (lambda x: x[0])
    assert meta["general.architecture"] == a and meta[f"{a}.block_count"] == len(views)
    assert meta[f"{a}.attention.head_count"] == per_layer(heads)
    assert meta[f"{a}.attention.head_count_kv"] == per_layer(kv)
    assert meta[f"{a}.feed_forward_length"] == per_layer(ffn)
    assert meta[f"{a}.attention.key_length"] == meta[f"{a}.rope.dimension_count"] == views[0].attn.head_dim
    if variant == "mixed":
        assert len(set(zip(heads, kv, ffn))) == 3 and len(views) == 3
    tensors = {t.name: t for t in reader.tensors}
    norm_rope = a in ("llama", "deci")
    for i, v in enumerate(views):
        written = {"attn_q": v.attn.q, "attn_k": v.attn.k, "attn_v": v.attn.v, "attn_output": v.attn.o,
                   "ffn_gate": v.mlp.gate, "ffn_up": v.mlp.up, "ffn_down": v.mlp.down}
        for short, lin in written.items():
            for kind in ("weight", "bias"):
                ours = getattr(lin, kind)
                if ours is None:
                    assert f"blk.{i}.{short}.{kind}" not in tensors
                    continue
                got = values(tensors[f"blk.{i}.{short}.{kind}"])
                if norm_rope and short in ("attn_q", "attn_k"):
                    ours = permute_rows(ours, heads[i] if short == "attn_q" else kv[i])
                assert got.shape == ours.shape and torch.equal(got, ours.detach().float()), (i, short, kind)
    assert torch.equal(values(tensors["token_embd.weight"]), model.model.embed_tokens.weight.detach())
    assert ("output.weight" in tensors) == (not model.config.tie_word_embeddings)


def test_the_tokenizer_and_chat_template_are_in_the_metadata(tokenizer, tmp_path):
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = pruned("llama", PLANS["uniform"])
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    meta = fields(gguf.GGUFReader(str(tmp_path / "m.gguf")))
    spec = json.loads((LAB_MODEL / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    eot = vocab["<|endoftext|>"]
    assert meta["tokenizer.ggml.token_type"][eot] == 3 and set(meta["tokenizer.ggml.token_type"]) == {1, 3}
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == eot
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template


@pytest.mark.parametrize("kind,ggml,tol", [("f16", "F16", 1e-3), ("bf16", "BF16", 1e-2), ("q8_0", "Q8_0", 2e-2)])
def test_tensor_types_are_the_weights_in_that_type(kind, ggml, tol, tokenizer, tmp_path):
    model = pruned("llama", PLANS["uniform"], head_dim=8)
    info = export_gguf(model, tokenizer, tmp_path / "m.gguf", kind)
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == ggml
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"        # norms stay f32
    if kind == "q8_0":      # down_proj reads 43 columns, o_proj 48: not whole 32-blocks, so written f16
        assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"
        assert {t.name for t in tensors.values() if t.tensor_type.name == "F16"} == \
            {t.name for t in tensors.values() if len(t.shape) == 2 and int(t.shape[0]) % 32}
        assert info["tensor_types"]["F16"] == 2 * len(model.model.layers)
    up = model.model.layers[0].mlp.up_proj.weight.detach()
    got = values(tensors["blk.0.ffn_up.weight"])
    assert got.shape == up.shape and (got - up).abs().max() <= tol * up.abs().max()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_uniform_export_loads_back_with_model_gguf_to_the_same_logits(family, tokenizer, tmp_path):
    """transformers' GGUF reader (model=gguf) derives head_dim from hidden / heads (Qwen3: its default 128),
    so the shape keeps the heads: MLP channels and a whole layer removed."""
    plan = PruningPlan(mlp={i: [0, 3, 7, 9, 20] for i in (0, 2)}, layers=[1])
    head_dim = 128 if family == "qwen3" else TINY[family]["hidden_size"] // TINY[family]["num_attention_heads"]
    model = pruned(family, plan, layers=3, head_dim=head_dim)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    cfg = compose_job("model=gguf", f"model.path={tmp_path / 'm.gguf'}", "model.device=cpu", f"cache.dir={tmp_path}/c")
    from hydra.utils import instantiate
    back, _ = instantiate(cfg.model).load()
    x = torch.randint(0, 8192, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_opt_and_a_rope_scaling_are_refused(tokenizer):
    opt = RandomModel(**dict(TINY["opt"], num_hidden_layers=2, intermediate_size=48), device="cpu").build()
    with pytest.raises(PruneLabError, match="does not support opt"):
        check_model(opt, tokenizer)
    llama = pruned("llama", PruningPlan())
    llama.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(PruneLabError, match="plain RoPE only"):
        check_model(llama, tokenizer)


def job(tmp_path, arch="llama", *extra):
    return compose_job(*tiny_overrides(arch, tmp_path), "output.plots=false", "reconstruct=none",
                       "importance=magnitude", "layer_importance=none", *extra)


def test_a_job_writes_model_gguf_and_records_it(tmp_path):
    record = run(job(tmp_path, "llama", "output.export=gguf", "output.gguf_type=q8_0"), tmp_path / "run")
    assert record is not None
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["export"]["gguf_type"] == "q8_0"
    path = tmp_path / "run" / "model.gguf"
    assert metrics["export"]["bytes"] == path.stat().st_size and metrics["export"]["architecture"] in ("llama", "deci")
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("overrides,line,before", [
    (["output.gguf_type=f16"], "output.gguf_type=f16 sets the tensors of output.export=gguf", "load"),
    (["output.export=gguf", "output.gguf_type=q4_0"], "output.gguf_type=q4_0 writes a 4-bit grid exactly, and "
     "this model has none", "load"),
    (["output.export=gguf", "output.gguf_type=q4_1", "method=sparsegpt", "quant=uniform", "quant.group_size=32"],
     "output.gguf_type=q4_1 needs quant=uniform with quant.bits=4, quant.sym=false", "load"),
    (["output.export=gguf", "reconstruct=bias"], "llama.cpp's qwen2 does not read", "score"),
])
def test_bad_gguf_exports_are_one_line_before_the_work(tmp_path, overrides, line, before):
    arch = "qwen2" if "reconstruct=bias" in overrides else "llama"
    cfg = job(tmp_path, arch, *overrides)
    with pytest.raises(PruneLabError) as err:
        run(cfg, tmp_path / "run")
    assert line in str(err.value) and "\n" not in str(err.value)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and before not in metrics["timings_s"]
    assert not (tmp_path / "run" / "model.gguf").exists()


def test_an_existing_gguf_file_is_never_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.gguf").write_bytes(b"mine")
    with pytest.raises(PruneLabError, match="already exists"):
        run(job(tmp_path, "llama", "output.export=gguf"), tmp_path / "run")
    assert (tmp_path / "run" / "model.gguf").read_bytes() == b"mine"


def test_a_qwen3_whose_layers_differ_is_refused_before_evaluating(tmp_path):
    with pytest.raises(PruneLabError, match="no q/k norms"):
        run(job(tmp_path, "qwen3", "output.export=gguf"), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "evaluate" not in metrics["timings_s"] and "prune" in metrics["timings_s"]


@pytest.mark.parametrize("args,line", [
    (["output.export=gguf", "output.gguf_type=q5_k"], "output.gguf_type"),                 # compose time (typed)
    (["output.export=gguf", "output.gguf_type=q4_0"], "output.gguf_type=q4_0 writes a 4-bit grid exactly"),
])
def test_cli_bad_gguf_options_are_one_line_and_exit_2(tmp_path, args, line):
    proc = run_cli(*tiny_overrides("llama"), *args, run_dir=tmp_path / "run", cache=tmp_path / "cache", timeout=300)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("prune_lab: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and line in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "model.gguf").exists()


def quant_job(tmp_path, sym: bool, kind: str, *extra):
    """The tiny llama, quantized by GPTQ (quant=uniform, 4 bits, groups of 32), exported as GGUF."""
    ov = [o for o in tiny_overrides("llama", tmp_path) if not o.startswith("model.intermediate_size")]
    return compose_job(*ov, "model.intermediate_size=64", "output.plots=false", "method=sparsegpt",
                       "method.sparsity=0", "method.blocksize=16", "quant=uniform", "quant.group_size=32",
                       f"quant.sym={str(sym).lower()}", "output.export=gguf", f"output.gguf_type={kind}", *extra)


@pytest.mark.parametrize("sym,kind", [(True, "q4_0"), (False, "q4_1")])
def test_a_quant_uniform_model_is_written_exactly_on_its_own_4_bit_grid(tmp_path, sym, kind):
    """The file's blocks dequantize (the gguf package's reference decoder) to the quantized model's weights up
    to the fp16 rounding of the block scale (and offset): the integer codes are the GPTQ run's own. llama.cpp's
    q4_0 rounding of those weights (gguf.quants.quantize) lands elsewhere."""
    from prune_lab import load_pruned
    run(quant_job(tmp_path, sym, kind, "output.save_model=true"), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["export"]["tensor_types"][kind.upper()] == 7 * 3         # every decoder linear
    model = load_pruned(tmp_path / "run" / "model")
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "run" / "model.gguf")).tensors}
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    for i, v in enumerate(layer_views(model)):
        for short, lin in {"attn_v": v.attn.v, "attn_output": v.attn.o, "ffn_up": v.mlp.up, "ffn_down": v.mlp.down}.items():
            t = tensors[f"blk.{i}.{short}.weight"]
            assert t.tensor_type == qtype
            ours = lin.weight.detach().float()
            got = values(t)
            block_max = ours.reshape(ours.shape[0], -1, 32).abs().amax(-1, keepdim=True)
            err = (got - ours).reshape(ours.shape[0], -1, 32).abs()
            assert (err <= 2 ** -11 * 6 * block_max + 1e-8).all(), (i, short, float((err / block_max).max()))
            if kind == "q4_0":       # llama.cpp's rule (d = signed max / -8) is another grid
                theirs = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(ours.numpy(), qtype), qtype))
                assert (theirs - ours).abs().max() > 20 * err.max()
