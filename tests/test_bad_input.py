"""Issue 22, items 1-7: every bad input is one `prune_lab: error:` line, exit 2, a failed run dir, and
requested work is done or refused. One CLI table for what only the CLI shows (Hydra's own errors, the
exit code of a refused `_target_`); the rest in process (run() -> one-line PruneLabError, metrics.json
`failed`, the stage it must fail before never started)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import compose_job, run_cli, text_job, tiny_model, tiny_overrides, write_small_corpus
from prune_lab.artifacts.checkpoint import save_pruned
from prune_lab.cache.scores import CHECKSUM, ScoreCache, tensors_checksum
from prune_lab.core.executor import apply_plan
from prune_lab.core.plan import PruningPlan
from prune_lab.errors import PruneLabError
from prune_lab.model import RandomModel
from prune_lab.recipes import run
from prune_lab.recipes.common import build
from prune_lab.study.plugin import PruneLabOptunaSweeper

FAST = ["output.plots=false", "reconstruct=none", "importance=magnitude", "layer_importance=none"]


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def fails(tmp_path, *overrides, before: str = "load", text: bool = False) -> str:
    """Run the tiny job in process (text: on the small local corpus): a one-line PruneLabError,
    metrics.json failed, stage `before` never began."""
    cfg = (text_job(tmp_path, "output.plots=false", *overrides) if text else
           compose_job(*tiny_overrides("llama", tmp_path), "output.plots=false", *overrides))
    with pytest.raises(PruneLabError) as err:
        run(cfg, tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "failed" and "\n" not in str(err.value)
    assert before not in m["timings_s"], m["timings_s"]
    return str(err.value)


# ---- the CLI table: what Hydra raises around the job, and the exit code of refused targets ----------
@pytest.mark.parametrize("args,line,run_dir", [
    (["allocator.ratoi=0.3"], "unknown key 'allocator.ratoi': allocator takes ratio, layer_start, layer_end, "
     "multiple_of, remove_empty_layers", False),                                   # compose time (item 6)
    (["+allocator.ratoi=0.3"], "unknown key 'allocator.ratoi': allocator takes ratio, layer_start, layer_end, "
     "multiple_of, remove_empty_layers", True),                                    # appended past the schema
    (["importance._target_=prune_lab.model.os.system"], "importance._target_ refused: Target 'os.system' "
     "(resolved from 'prune_lab.model.os.system') cannot be authorized by the Hydra", True),       # item 7
    (["+hydra.callbacks.evil._target_=os.system"], "hydra.callbacks.evil._target_ refused: Target 'os.system' "
     "cannot be authorized by the Hydra", False),
    (["-m", "hydra/sweeper=prune_lab_optuna", "hydra.sweeper.max_failure_rate=2", "allocator.ratio=interval(0.1,0.2)"],
     "hydra.sweeper.max_failure_rate must be in [0, 1], got 2.0", False),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, line, run_dir):
    proc = run_cli(*tiny_overrides("llama"), *args, f"hydra.sweep.dir={tmp_path}/sweep", run_dir=tmp_path / "run",
                   cache=tmp_path / "cache", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert len(errors) == 1 and errors[0].startswith(f"prune_lab: error: {line}"), proc.stderr[-3000:]
    if "refused" in line:
        assert errors[0].endswith("(a job instantiates only prune_lab.* and the patterns in PRUNE_LAB_TRUSTED_TARGETS)")
    if run_dir:
        assert metrics(tmp_path / "run")["status"] == "failed"
    else:                                            # failed before any job: nothing written that looks finished
        assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "sweep").exists()


# ---- item 1: layer_importance=file is read and checked when built; its layer count before scoring ------
@pytest.mark.parametrize("name,content,message", [
    ("notjson.json", "not json", "is not JSON"),
    ("list.json", "[1, 2, 3]", "got a JSON list"),
    ("string.json", '"abc"', "got a JSON str"),
    ("ragged.json", '{"layer_importance": [[1, 2], [3]]}', "one finite number per layer"),
    ("strings.json", '{"layer_importance": ["a", "b", "c"]}', "one finite number per layer"),
    ("nan.json", '{"layer_importance": [1, NaN, 2]}', "one finite number per layer"),
    ("scalar.json", '{"layer_importance": 3}', "must be a list of numbers"),
    ("corrupt.safetensors", "\x00" * 100, "is not a safetensors score file"),
])
def test_a_malformed_layer_importance_file_fails_when_built(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    assert message in fails(tmp_path, "layer_importance=file", f"layer_importance.path={tmp_path / name}")


def test_a_layer_importance_file_of_another_depth_fails_before_scoring(tmp_path):
    (tmp_path / "layers.json").write_text('{"layer_importance": [0.5, 0.25]}')
    message = fails(tmp_path, "layer_importance=file", f"layer_importance.path={tmp_path}/layers.json",
                    "allocator=global", before="score")
    assert "holds the importance of 2 layers, the model has 3" in message


# ---- item 2: requested work is done or refused ------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["method=wanda", "method.asymmetric=0.5"], "method.asymmetric=0.5 would change nothing"),
    (["method=magnitude", "method.asymmetric=0.25", "method.prune_n=2", "method.prune_m=4"], "only masks them"),
    (["allocator=none", "output.export=hf"], "output.export=hf with allocator=none: an analyse-only job prunes "
     "nothing to export"),
    (["allocator=none", "finetune=lora"], "finetune=lora with allocator=none: an analyse-only job prunes nothing "
     "to recover"),
    (["allocator=none", "verify=true"], "verify=true with allocator=none"),
])
def test_requested_work_that_would_be_skipped_is_refused(tmp_path, overrides, message):
    assert message in fails(tmp_path, *overrides)


def test_asymmetric_wanda_with_a_quant_sweep_is_honoured(tmp_path):
    base = ["output.plots=false", "method=wanda", "quant=uniform", "method.blocksize=16", "output.save_model=true"]
    for asym in ("0", "0.5"):
        run(text_job(tmp_path, *base, f"method.asymmetric={asym}"), tmp_path / asym)
    from prune_lab import load_pruned        # the quantized linears are packed (quantized.safetensors)
    a, b = (load_pruned(tmp_path / d / "model").state_dict() for d in ("0", "0.5"))
    assert any(not torch.equal(a[k], b[k]) for k in a)          # the asymmetric target changes the sweep


def test_verify_at_ratio_0_verifies_the_empty_plan(tmp_path):
    run(text_job(tmp_path, *FAST, "allocator.ratio=0", "verify=true"), tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "ok" and m["verify"]["passed"] and m["verify"]["max_logit_diff"] == 0.0


# ---- item 3: degenerate values ----------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["method=wanda", "quant=mixed", "quant.weights=[nan,0.25,0.15,0.25,0.10]"], "quant.weights must be 5 non-negative"),
    (["method=wanda", "quant=mixed", "quant.score_power=nan"], "quant.score_power must be a finite exponent >= 0"),
    (["method=wanda", "quant=mixed", "quant.allocation=threshold3", "quant.thresholds=[2,1]"],
     "quant.thresholds must be two finite scores [low, high] with low <= high, got [2.0, 1.0]"),
    (["method=wanda", "quant=uniform", "quant.bits=33", "quant.bits_options=[4,33]"],
     "quant.bits_options must be integers in [1, 16], got [4, 33]"),
    (["method=wanda", "method.prune_n=4", "method.prune_m=4"], "N:M 4:4 zeros every weight"),
    (["reconstruct.damp=1e30"], "reconstruct.damp must be in (0, 1)"),
])
def test_degenerate_values_fail_when_built(tmp_path, overrides, message):
    assert message in fails(tmp_path, *overrides)


@pytest.mark.parametrize("key,value,message", [("n_trials", -1, "hydra.sweeper.n_trials must be >= 1, got -1"),
                                               ("n_jobs", 0, "hydra.sweeper.n_jobs must be >= 1, got 0"),
                                               ("max_failure_rate", float("nan"), "max_failure_rate must be in [0, 1]")])
def test_degenerate_sweeper_settings_fail_when_the_sweeper_is_built(key, value, message):
    settings = dict(sampler=None, direction="minimize", storage=None, study_name=None, n_trials=2, n_jobs=1,
                    max_failure_rate=0.5, custom_search_space=None, params=None, constraints=True,
                    reuse_plans=True, heartbeat_interval=60)
    with pytest.raises(PruneLabError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PruneLabOptunaSweeper(**{**settings, key: value})


# ---- item 4: importance=file knows which model and calibration its scores are from -----------------
@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysed")
    run(text_job(root, *FAST, "allocator=none"), root / "run")
    return root / "run"


def from_file(tmp_path, analysed, *extra, name="run"):
    cfg = text_job(tmp_path, *FAST, "allocator=uniform", "importance=file", f"importance.path={analysed}", *extra)
    run(cfg, tmp_path / name)
    return metrics(tmp_path / name)


def test_scores_record_their_model_and_calibration_and_another_model_is_refused(tmp_path, analysed, caplog):
    from safetensors import safe_open
    with safe_open(str(analysed / "scores.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["prune_lab_model"].split(":")[0] in ("xxh3_128", "sha256") and len(meta["prune_lab_tokens"]) == 64
    with caplog.at_level(logging.WARNING, logger="prune_lab"):
        assert from_file(tmp_path, analysed)["status"] == "ok"                    # the same model: silent
    assert not [r for r in caplog.records if "fingerprint" in r.getMessage()]
    message = fails(tmp_path, *FAST, "allocator=uniform", "importance=file", f"importance.path={analysed}",
                    "model.seed=1", before="allocate", text=True)
    there, here = meta["prune_lab_model"][:25], message.split(" here")[0].rsplit(", ", 1)[1]
    assert "holds the scores of another model" in message and there in message and here != there
    assert message.endswith("set importance.allow_other_model=true to use them anyway")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prune_lab"):
        assert from_file(tmp_path, analysed, "model.seed=1", "importance.allow_other_model=true",
                         "calibration.n_samples=2", name="other")["status"] == "ok"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "another model" in warned and "used anyway" in warned and "other calibration tokens" in warned


def test_a_score_file_written_before_the_fingerprints_is_a_warning(tmp_path, analysed, caplog):
    tensors = load_file(str(analysed / "scores.safetensors"))
    save_file(tensors, str(tmp_path / "old.safetensors"))                 # no metadata, as before this change
    with caplog.at_level(logging.WARNING, logger="prune_lab"):
        assert from_file(tmp_path, tmp_path / "old.safetensors")["status"] == "ok"
    assert any("records no model fingerprint" in r.getMessage() for r in caplog.records)


def test_a_2d_or_incomplete_score_file_fails_when_built(tmp_path):
    save_file({"attn.0": torch.ones(2, 3), "mlp.0": torch.ones(4)}, str(tmp_path / "flat.safetensors"))
    save_file({"attn.0": torch.ones(2), "attn.1": torch.ones(2), "mlp.0": torch.ones(4)}, str(tmp_path / "gap.safetensors"))
    assert "unit scores must be 1-D (one per GQA group / MLP channel), attn.0 is [2, 3]" in fails(
        tmp_path, "importance=file", f"importance.path={tmp_path}/flat.safetensors")
    assert "unit scores lack mlp.1" in fails(tmp_path, "importance=file", f"importance.path={tmp_path}/gap.safetensors")


# ---- item 5: a cache entry with a valid checksum but a missing tensor is corrupt --------------------
def test_a_cache_entry_missing_a_tensor_is_recomputed_and_replaced(tmp_path, caplog):
    store = ScoreCache(tmp_path)
    whole = {"attn.0": torch.ones(2), "attn.1": torch.ones(2), "mlp.0": torch.ones(4), "mlp.1": torch.ones(4)}
    for key, tensors in (("units", {k: v for k, v in whole.items() if k != "mlp.1"}), ("layers", {"other": torch.ones(3)})):
        store.dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(store.dir / f"{key}.safetensors"), metadata={CHECKSUM: tensors_checksum(tensors)})
    from prune_lab.core.scores import UnitScores
    with caplog.at_level(logging.WARNING, logger="prune_lab"):
        scores, reused = store.unit_scores("units", lambda: UnitScores.from_tensors(whole))
        layer, layer_reused = store.layer_scores("layers", lambda: torch.arange(3.0))
    assert not reused and not layer_reused and len(scores.mlp) == 2 and torch.equal(layer, torch.arange(3.0))
    assert sum("corrupt or truncated" in r.getMessage() for r in caplog.records) == 2
    assert set(load_file(str(store.dir / "units.safetensors"))) == set(whole)          # replaced
    fresh = ScoreCache(tmp_path)
    assert fresh.unit_scores("units", lambda: pytest.fail("recomputed again"))[1]


# ---- item 6: configuration the job can check, checked when built or right after loading -------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A non-uniform prune_lab checkpoint, and a copy of it without tokenizer files."""
    root = tmp_path_factory.mktemp("checkpoints")
    model, tokenizer = tiny_model(), RandomModel(device="cpu").load_tokenizer()
    apply_plan(model, PruningPlan(attn={}, mlp={0: [0, 1], 1: [5]}))
    save_pruned(model, tokenizer, root / "uneven")
    save_pruned(model, None, root / "no_tokenizer")
    return root


@pytest.mark.parametrize("overrides,message,before", [
    (["importance=file"], "importance.path must be set: add importance.path=<value> to the command line", "load"),
    (["layer_importance=file"], "layer_importance.path must be set", "load"),
    (["model=hf"], "model.path must be set", "load"),
    (["importance=obs", "importance.chunks=0"], "importance.chunks must be >= 1", "load"),
    (["engine.device=foo"], "engine.device=foo is not a device: use auto, cpu, cuda or cuda:<index>", "load"),
    (["engine.device=cuda:99"], "engine.device=cuda:99 is not available (this torch sees ", "load"),
    (["model.device=cuda:99"], "model.device=cuda:99 is not available", "load"),
    (["method=wanda", "method.prune_n=2", "method.prune_m=5"], "N:M with M=5 needs input widths divisible by M",
     "engine"),
    (["method=magnitude", "method.prune_n=2", "method.prune_m=5"], "N:M with M=5 needs input widths", "engine"),
    (["model.num_key_value_heads=3"], "num_attention_heads a multiple of num_key_value_heads", "load"),
    (["model.vocab_size=100"], "model.vocab_size=100 < the lab tokenizer's 8192 tokens", "score"),
])
def test_checkable_configuration_fails_before_the_work(tmp_path, overrides, message, before):
    if overrides[0] == "model=hf":                       # the tiny overrides set model=random's keys
        cfg = compose_job("model=hf", f"cache.dir={tmp_path}/cache")
        with pytest.raises(PruneLabError, match=message):
            run(cfg, tmp_path / "run")
        assert metrics(tmp_path / "run")["status"] == "failed"
        return
    assert message in fails(tmp_path, *overrides, before=before)


def test_checkpoints_that_cannot_load_as_asked_fail_with_one_line(tmp_path, checkpoints):
    common = [f"cache.dir={tmp_path}/cache", "model.dtype=float32", "model.device=cpu", "allocator.ratio=0"]
    for overrides, message in (
            (["model=hf", f"model.path={checkpoints}/uneven"], "is a prune_lab checkpoint with per-layer shapes or "
             f"added biases: load it with model=pruned model.path={checkpoints}/uneven"),
            (["model=pruned", f"model.path={checkpoints}/no_tokenizer"],
             "holds no tokenizer files: name one with model.tokenizer=<dir or hub id>")):
        with pytest.raises(PruneLabError, match=message) as err:
            run(compose_job(*overrides, *common), tmp_path / "run")
        assert "\n" not in str(err.value) and metrics(tmp_path / "run")["status"] == "failed"


def test_a_non_utf8_text_split_is_one_line(tmp_path):
    write_small_corpus(tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"fine text " * 50 + b"\xff\xfe bad")
    message = fails(tmp_path, "data=text", f"data.train={tmp_path}/bad.txt", f"data.test={tmp_path}/test.txt",
                    before="score")
    assert "data.train file" in message and "is not UTF-8 text (byte 0xff at offset 500)" in message


# ---- item 7: a refused `_target_` is one line, and PRUNE_LAB_TRUSTED_TARGETS is the jobs' list too ------
@pytest.mark.parametrize("key,target", [("importance", "os.system"), ("model", "prune_lab.model.torch.load"),
                                        ("data", "builtins.exec"), ("engine", "prune_lab.data.gzip.open"),
                                        ("layer_importance", "importlib.import_module"),
                                        ("importance", "prune_lab.importance.Taylor.__init__.__globals__")])
def test_a_forbidden_target_is_one_line_naming_it(key, target):
    cfg = compose_job(*tiny_overrides("llama"), f"{key}._target_={target}")
    with pytest.raises(PruneLabError) as err:
        build(cfg[key])
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{key}._target_ refused: ") and f"'{target}'" in line
    assert "PRUNE_LAB_TRUSTED_TARGETS" in line


def test_trusted_targets_from_the_environment_reach_the_jobs_components(monkeypatch):
    cfg = compose_job(*tiny_overrides("llama"), "engine._target_=collections.Counter")
    with pytest.raises(PruneLabError, match="is not in the Hydra execution whitelist"):
        build(cfg.engine)
    monkeypatch.setenv("PRUNE_LAB_TRUSTED_TARGETS", "collections.Counter")
    assert build(cfg.engine)["device"] == "auto"
