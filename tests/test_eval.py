"""Evaluation group: ppl over several datasets, efficiency metrics, zero-shot through lm-eval."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra.utils import instantiate
from safetensors.torch import save

from conftest import compose_job, tiny_model
from prune_lab.data import LocalText, TokenStreams, WikiVital
from prune_lab.errors import DataUnavailable, PruneLabError
from prune_lab.eval import Evaluator
from prune_lab.artifacts.checkpoint import unique_state_dict
from prune_lab.eval.efficiency import efficiency, safetensors_bytes
from prune_lab.eval.ppl import perplexity
from prune_lab.model import RandomModel
from prune_lab.core.plan import PruningPlan
from prune_lab.core.executor import apply_plan

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def tokenizer():
    return RandomModel(device="cpu").load_tokenizer()


def contiguous_state(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in unique_state_dict(model)[0].items()}


# ---- efficiency ---------------------------------------------------------------------------------
def test_efficiency_metrics_sane_and_shrink_with_pruning(tokenizer):
    model = tiny_model("llama", layers=2)
    dense = efficiency(model, tokenizer, prompt_len=16, gen_tokens=4, repeats=1)
    assert dense["efficiency/params"] == sum(p.numel() for p in model.parameters())
    assert dense["efficiency/checkpoint_bytes"] == len(save(contiguous_state(model), metadata={"format": "pt"}))
    for key in ("prefill_latency_ms", "generate_latency_ms", "prefill_tokens_per_s",
                "generate_tokens_per_s", "peak_memory_mb"):
        assert dense[f"efficiency/{key}"] > 0, key
    assert dense["efficiency/decode_ms_per_token"] >= 0
    assert dense["efficiency/prefill_tokens_per_s"] == pytest.approx(16 / (dense["efficiency/prefill_latency_ms"] / 1e3))
    assert dense["efficiency/generate_tokens_per_s"] == pytest.approx(4 / (dense["efficiency/generate_latency_ms"] / 1e3))
    assert dense["efficiency/peak_memory_kind"] == "process_peak_rss"

    apply_plan(model, PruningPlan(attn={0: [1]}, mlp={1: list(range(10))}))
    pruned = efficiency(model, tokenizer, prompt_len=16, gen_tokens=4, repeats=1)
    removed = dense["efficiency/params"] - pruned["efficiency/params"]
    assert removed == (4 * 8 * 64 + 2 * 8 * 64 + 64 * 4 * 8) + 10 * 3 * 64   # one GQA group + 10 channels
    assert pruned["efficiency/checkpoint_bytes"] == len(save(contiguous_state(model), metadata={"format": "pt"}))
    assert dense["efficiency/checkpoint_bytes"] - pruned["efficiency/checkpoint_bytes"] == pytest.approx(4 * removed, abs=64)


def test_efficiency_decodes_over_the_kv_cache_per_batch_size(tokenizer):
    model = tiny_model("llama", layers=2)
    calls = []
    model.model.register_forward_pre_hook(lambda _m, args, kw: calls.append(tuple(kw["input_ids"].shape)),
                                          with_kwargs=True)
    out = efficiency(model, tokenizer, prompt_len=16, gen_tokens=3, batch_sizes=[1, 4], repeats=2, warmup=1)
    per_run = lambda b: [(b, 16)] + [(b, 1)] * 3              # noqa: E731  prefill, then one token a step
    assert calls == per_run(1) * 3 + per_run(4) * 3            # (warm-up + 2 repeats) per batch size
    for b in (1, 4):
        m = {k.split("/")[-1]: v for k, v in out.items() if k.startswith(f"efficiency/bs{b}/")}
        assert m["prefill_tokens_per_s"] == pytest.approx(b * 16 / (m["prefill_latency_ms"] / 1e3))
        assert m["decode_tokens_per_s"] == pytest.approx(b / (m["decode_ms_per_token"] / 1e3))
        assert m["generate_latency_ms"] >= m["prefill_latency_ms"]
    assert out["efficiency/decode_tokens_per_s"] == out["efficiency/bs1/decode_tokens_per_s"]
    with pytest.raises(PruneLabError, match="batch sizes >= 1"):
        efficiency(model, tokenizer, batch_sizes=[0])


def test_checkpoint_size_matches_safetensors_for_mixed_dtypes_and_tied_weights():
    mixed = {"b.weight": torch.zeros(7, 3, dtype=torch.bfloat16), "a": torch.zeros(5),
             "c": torch.zeros(2, dtype=torch.int64), "flag": torch.zeros(9, dtype=torch.bool)}
    assert safetensors_bytes(mixed) == len(save(mixed))
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert list(unique_state_dict(tied)[0]) == ["0.weight"]            # the tied copy is stored once
    only = {"0.weight": tied[0].weight.detach()}
    assert safetensors_bytes(unique_state_dict(tied)[0], {"format": "pt"}) == len(save(only, {"format": "pt"}))


def test_efficiency_rejects_lengths_beyond_the_model(tokenizer):
    with pytest.raises(PruneLabError, match="max_position_embeddings=512"):
        efficiency(tiny_model("llama", layers=1), tokenizer, prompt_len=500, gen_tokens=32)


# ---- perplexity over several datasets -----------------------------------------------------------
def test_ppl_over_job_data_and_a_named_dataset(tmp_path, tokenizer):
    text = WikiVital().text("valid")[:20000]
    (tmp_path / "test.txt").write_text(text)
    cfg = compose_job("eval=full", "eval.ppl.datasets=[data,wiki_vital]", "eval.ppl.seq_len=32",
                      "eval.ppl.max_windows=3", "eval.ppl.batch_size=2", "eval.efficiency=null",
                      "data=text", f"data.test={tmp_path}/test.txt")
    evaluator = instantiate(cfg.eval, _convert_="all")
    assert evaluator.dataset_names() == ["data", "wiki_vital"]
    local, named = instantiate(cfg.data), WikiVital()
    streams = TokenStreams(tokenizer)
    model = tiny_model("qwen2", layers=2)
    out = evaluator(model, tokenizer, {"data": local, "wiki_vital": named}, streams)
    assert set(out) == {"ppl/data", "ppl/wiki_vital"}          # zero-shot off: eval=full has no tasks
    for key, dataset in (("ppl/data", local), ("ppl/wiki_vital", named)):
        stream = tokenizer(dataset.text("test"), return_tensors="pt").input_ids[0]
        assert out[key] == pytest.approx(perplexity(model, stream, 32, 2, 3, progress=False), rel=1e-6)
    assert out["ppl/data"] != out["ppl/wiki_vital"]


def test_prefix_windows_report_the_first_n_windows_from_the_same_pass(tokenizer):
    cfg = compose_job("eval.ppl.seq_len=32", "eval.ppl.batch_size=4", "eval.ppl.max_windows=12",
                      "eval.ppl.prefix_windows=[4]")
    evaluator = instantiate(cfg.eval, _convert_="all")
    model, streams, data = tiny_model("llama", layers=2), TokenStreams(tokenizer), WikiVital()
    out = evaluator(model, tokenizer, {"data": data}, streams)
    assert list(out) == ["ppl/data", "ppl/data@4"]             # the objective (first ppl/ key) stays ppl/data
    stream = streams(data, "test")
    assert out["ppl/data"] == perplexity(model, stream, 32, 4, 12, progress=False)
    assert out["ppl/data@4"] == pytest.approx(perplexity(model, stream, 32, 4, 4, progress=False), rel=1e-9, abs=0)
    assert compose_job().eval.ppl.prefix_windows == []          # default: no extra metric


def test_eval_configs_compose():
    full = compose_job("eval=full").eval
    assert full.ppl.datasets == ["data"] and full.efficiency.gen_tokens == 32 and full.zeroshot.tasks == []
    assert compose_job("eval=efficiency").eval.zeroshot is None
    assert compose_job("eval=zeroshot").eval.zeroshot.tasks == ["hellaswag", "arc_easy", "piqa"]


# ---- zero-shot ----------------------------------------------------------------------------------
def reference_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """acc by hand: the choice with the highest summed log-probability after the prompt."""
    correct = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = []
        for choice in doc["choices"]:
            whole, ctx = tokenizer.encode(context + " " + choice), tokenizer.encode(context)
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]
            cont = torch.tensor(whole[len(ctx):])
            lls.append(logp[len(ctx) - 1:].gather(1, cont[:, None]).sum().item())
        correct += int(max(range(len(lls)), key=lls.__getitem__) == doc["answer"])
    return correct / len(docs)


def test_zeroshot_local_task_scores_the_in_memory_pruned_model(tokenizer):
    import json
    from prune_lab.eval.zeroshot import zero_shot
    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    model = tiny_model("llama", layers=2, seed=1)
    dense_acc = reference_accuracy(model, tokenizer, docs)
    apply_plan(model, PruningPlan(attn={1: [0]}, mlp={0: list(range(20))}))
    assert reference_accuracy(model, tokenizer, docs) != dense_acc   # so the check below tells them apart
    out = zero_shot(model, tokenizer, ["prune_lab_tiny_mc"], include_path=str(TASKS), batch_size=4)
    assert out["zeroshot/prune_lab_tiny_mc/docs"] == len(docs)
    assert out["zeroshot/prune_lab_tiny_mc/acc"] == pytest.approx(reference_accuracy(model, tokenizer, docs))
    assert 0 < out["zeroshot/prune_lab_tiny_mc/acc_stderr"] < 1


def test_zeroshot_through_the_evaluator_config_with_limit(tokenizer):
    cfg = compose_job("eval=zeroshot", "eval.ppl=null", "eval.zeroshot.tasks=[prune_lab_tiny_mc]",
                      f"eval.zeroshot.include_path={TASKS}", "eval.zeroshot.limit=5",
                      "eval.zeroshot.batch_size=5")
    out = instantiate(cfg.eval, _convert_="all")(tiny_model("mistral", layers=1), tokenizer, {}, None)
    assert out["zeroshot/prune_lab_tiny_mc/docs"] == 5
    assert out["zeroshot/prune_lab_tiny_mc/acc"] in {i / 5 for i in range(6)}


def test_zeroshot_task_data_unreachable_offline_is_one_clear_error(tokenizer, monkeypatch):
    from prune_lab.eval.zeroshot import zero_shot
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataUnavailable, match="unreachable.*Offline") as err:
        zero_shot(tiny_model("llama", layers=1), tokenizer, ["prune_lab_hub_only"], include_path=str(TASKS))
    assert "\n" not in str(err.value)


def test_zeroshot_without_the_extra_is_one_clear_error(tokenizer, monkeypatch):
    from prune_lab.eval.zeroshot import zero_shot
    monkeypatch.setitem(sys.modules, "lm_eval", None)          # makes `import lm_eval` raise ImportError
    with pytest.raises(PruneLabError, match=r"not installed: pip install 'prune_lab\[eval\]'") as err:
        Evaluator(ppl=None, zeroshot={"tasks": ["prune_lab_tiny_mc"], "include_path": str(TASKS)})
    assert "\n" not in str(err.value)
    assert Evaluator(zeroshot={"tasks": []}).zeroshot == {"tasks": []}     # zero-shot off: no extra needed
    with pytest.raises(PruneLabError, match="not installed"):
        zero_shot(None, tokenizer, ["x"])


def test_zeroshot_flattens_lm_eval_results():
    from prune_lab.eval.zeroshot import flatten_results
    results = {"results": {"a": {"alias": "a", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 4},
                           "b": {"acc,none": 0.25, "acc_norm,none": 0.75, "exact_match,strict": 1.0}}}
    assert flatten_results(results, ["a", "b"]) == {
        "zeroshot/a/acc": 0.5, "zeroshot/a/acc_stderr": 0.1, "zeroshot/a/docs": 4.0,
        "zeroshot/b/acc": 0.25, "zeroshot/b/acc_norm": 0.75, "zeroshot/b/exact_match/strict": 1.0,
        "zeroshot/avg_acc": 0.375}
