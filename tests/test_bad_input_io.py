"""Bad input and hostile conditions around I/O (issue 22, items 8-13): full disks, late or misleading
checks, oversampled calibration, a lying checkpoint manifest, study storages. One CLI table for what
only the CLI shows (one `prune_lab: error:` line, exit code 2, metrics.json `failed`, nothing half
written); the rest in-process (full disks and what kill -9 leaves in-process: tests/test_rundir.py)."""
from __future__ import annotations

import json
import os
import textwrap

import optuna
import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, cli_env, compose_job, run_cli, tiny_model, tiny_overrides, write_small_corpus
from prune_lab.artifacts.checkpoint import load_pruned, save_pruned
from prune_lab.data import Calibration, TokenStreams, WikiVital
from prune_lab.errors import CheckpointError, PruneLabError
from prune_lab.importance import FromFile, ObsError, Taylor
from prune_lab.method.sparsegpt import SparseGPT
from prune_lab.model import RandomModel
from prune_lab.quant.uniform import Uniform
from prune_lab.recipes import run
from prune_lab.study.location import locate, pin_storage

# ---- the CLI table ------------------------------------------------------------------------------
FULL_CHECKPOINT = '''
import safetensors.torch as st
_save = st.save_file
def save_file(tensors, filename, *a, **k):     # the disk fills while the checkpoint is written
    if str(filename).endswith("model.safetensors"):
        open(filename, "wb").write(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    return _save(tensors, filename, *a, **k)
st.save_file = save_file
'''
FULL_STUDY_DB = '''
import sqlite3
import sqlalchemy.exc
from optuna.storages import RDBStorage
_set = RDBStorage.set_trial_user_attr
def set_trial_user_attr(self, trial_id, key, value):   # the study database fills after the first job
    if key == "results":
        raise sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    return _set(self, trial_id, key, value)
RDBStorage.set_trial_user_attr = set_trial_user_attr
'''
STUDY = ["-m", "hparams_search=optuna_distribution", "hydra.sweeper.storage=sqlite:///{tmp}/study.db",
         "hydra.sweeper.study_name=full", "hydra.sweeper.n_trials=2", "hydra/sweeper/sampler=random"]

# id: (overrides of the tiny llama job on a small local corpus, sitecustomize, the error line, the
#      first stage that must not have run: "load" = a configuration error, "score" = known after loading)
CASES = {
    "obs damp -1": (["importance=obs", "importance.damp=-1"], None,
                    "importance.damp must be a finite number > 0 (relative Gram damping), got -1.0", "load"),
    "method damp inf": (["method=sparsegpt", "method.damp=inf"], None,
                        "method.damp must be a finite number > 0", "load"),
    "quant bits 0": (["method=sparsegpt", "quant=uniform", "quant.bits=0", "quant.bits_options=[0,2,4]"], None,
                     "quant.bits_options must be integers in [1, 16], got [0, 2, 4]", "load"),
    "export opt": (["ARCH=opt", "output.export=hf"], None, "output.export=hf does not support opt", "score"),
    "export added biases": (["reconstruct=bias", "output.export=hf"], None,
                            "output.export=hf: reconstruct=bias adds biases to ['down_proj', 'o_proj']", "score"),
    "tiny train split": (["data.train={tmp}/tiny.txt"], None, "x oversampling: the windows repeat tokens", "score"),
    "full disk, checkpoint": (["output.save_model=true"], FULL_CHECKPOINT, "no space left on {tmp}/run/model", None),
    "full study database": (STUDY, FULL_STUDY_DB, "no space left on {tmp}/study.db (study 'full')", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_and_full_disks_are_one_line_and_exit_2(tmp_path, case):
    overrides, site, message, not_reached = CASES[case]
    message = message.replace("{tmp}", str(tmp_path))
    corpus = write_small_corpus(tmp_path)
    (tmp_path / "tiny.txt").write_text((corpus / "train.txt").read_text()[:300])     # ~80 tokens
    arch = next((o.split("=")[1] for o in overrides if o.startswith("ARCH=")), "llama")
    args = [*tiny_overrides(arch, tmp_path), "data=text", f"data.train={corpus}/train.txt",
            f"data.test={corpus}/test.txt", "output.plots=false",
            *(o.replace("{tmp}", str(tmp_path)) for o in overrides if not o.startswith("ARCH="))]
    paths = [str(REPO)]
    if site:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(textwrap.dedent(site))
        paths.insert(0, str(tmp_path / "site"))
    env = cli_env(tmp_path / "cache", tmp_path / "studies", PYTHONPATH=os.pathsep.join(paths))
    study = "-m" in args
    out = run_cli(*args, run_dir=None if study else tmp_path / "run", cwd=tmp_path, env=env, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.startswith("prune_lab:")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines[0].startswith("prune_lab: error: ") and message in lines[0]
    if study:        # no trial left RUNNING: the one whose results did not fit is failed
        trials = optuna.load_study(study_name="full", storage=f"sqlite:///{tmp_path}/study.db").trials
        assert [t.state.name for t in trials] == ["FAIL"]
        assert "no space left" in trials[0].user_attrs["failed_because"]
        return
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and message.split(" (")[0] in metrics["error"]
    if not_reached:
        assert not_reached not in metrics["timings_s"], metrics["timings_s"]
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "model" not in left and not [n for n in left if n.startswith((".tmp-", ".old-"))], left


# ---- item 9: late or misleading checks --------------------------------------------------------------
@pytest.mark.parametrize("build, message", [
    (lambda: ObsError(damp=-1), "importance.damp must be a finite number > 0"),
    (lambda: ObsError(damp=float("nan")), "importance.damp must be a finite number > 0"),
    (lambda: SparseGPT(damp=float("inf")), "method.damp must be a finite number > 0"),
    (lambda: Uniform(bits=0, bits_options=(0, 2, 4)), r"quant.bits_options must be integers in \[1, 16\]"),
])
def test_degenerate_damping_and_bits_are_refused_when_built(build, message):
    with pytest.raises(PruneLabError, match=message):
        build()


def test_a_nan_in_a_score_file_is_blamed_on_the_file_not_on_fp16(tmp_path):
    tensors = Taylor()(tiny_model("llama", layers=2), [torch.randint(0, 100, (2, 16))]).to_tensors()
    tensors["mlp.1"][3] = float("nan")
    save_file(tensors, str(tmp_path / "scores.safetensors"))
    with pytest.raises(PruneLabError) as err:          # when the component is built
        FromFile(str(tmp_path / "scores.safetensors"))
    assert f"the unit scores in {tmp_path / 'scores.safetensors'}: layer 1 mlp scores contain NaN/inf" in str(err.value)
    assert "fp16" not in str(err.value) and "recompute it" in str(err.value)


# ---- item 10: oversampled calibration ----------------------------------------------------------------
def test_calibration_that_must_repeat_tokens_is_refused_unless_allowed():
    stream = torch.arange(721)
    with pytest.raises(PruneLabError, match=r"64 x 256 = 16384 tokens from the 721-token train split \(22.7x"):
        Calibration().batches(stream, seed=0)
    windows = Calibration(allow_overlap=True).batches(stream, seed=0)
    assert sum(len(w) for w in windows) == 64
    Calibration(n_samples=2, seq_len=256).batches(stream, seed=0)        # 0.7x: distinct windows fit


def test_the_default_job_draws_its_calibration_from_a_split_70_times_larger():
    tokenizer = RandomModel(device="cpu").load_tokenizer()
    n_tokens = len(TokenStreams(tokenizer)(WikiVital(), "train"))
    calibration = Calibration()                         # the schema's and conf/config.yaml's defaults
    assert calibration.n_samples * calibration.seq_len / n_tokens < 1 / 50
    calibration.check(n_tokens)


def test_an_oversampled_layer_importance_count_fails_before_scoring(tmp_path):
    corpus = write_small_corpus(tmp_path)
    cfg = compose_job(*tiny_overrides("llama", tmp_path), "data=text", f"data.train={corpus}/train.txt",
                      f"data.test={corpus}/test.txt", "layer_importance.n_samples=100000", "output.plots=false")
    with pytest.raises(PruneLabError, match="oversampling"):
        run(cfg, tmp_path / "run")
    timings = json.loads((tmp_path / "run" / "metrics.json").read_text())["timings_s"]
    assert "load" in timings and "score" not in timings


# ---- item 11: a manifest checked against the index first ---------------------------------------------
def test_a_manifest_of_3000_layers_is_refused_before_any_skeleton_is_built(tmp_path, monkeypatch):
    from prune_lab.artifacts import checkpoint
    path = save_pruned(tiny_model("llama", layers=2), None, tmp_path / "ck")
    config = json.loads((path / "config.json").read_text())
    config["prune_lab"]["layers"] *= 1500
    (path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(checkpoint, "build_skeleton", lambda *a, **k: pytest.fail("skeleton built"))
    with pytest.raises(CheckpointError, match="lists 3000 decoder layers, the file holds 2"):
        load_pruned(path)


# ---- item 13: study storages ----------------------------------------------------------------------
def test_a_relative_study_url_resolves_once_where_the_study_was_started(tmp_path, monkeypatch):
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    registry = tmp_path / "cache"
    monkeypatch.chdir(tmp_path / "a")
    first = locate("sqlite:///rel.db", "s", registry)
    assert first == f"sqlite:///{tmp_path}/a/rel.db"
    (tmp_path / "a" / "rel.db").write_bytes(b"")          # the study was created there
    monkeypatch.chdir(tmp_path / "b")
    assert locate("sqlite:///rel.db", "s", registry) == first           # resumed from another directory
    assert locate("sqlite:///rel.db", "other", registry) == f"sqlite:///{tmp_path}/b/rel.db"
    (tmp_path / "c" / "rel.db").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "c")
    assert locate("sqlite:///rel.db", "s", registry) == f"sqlite:///{tmp_path}/c/rel.db"   # a file here wins
    assert locate("postgresql://u@h/db", "s", registry) == "postgresql://u@h/db"
    assert locate(f"sqlite:///{tmp_path}/x.db", "s", registry) == f"sqlite:///{tmp_path}/x.db"


def test_every_trial_is_handed_the_resolved_url():
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"hydra": {"sweeper": {"storage": "sqlite:///rel.db"},
                                      "overrides": {"hydra": ["hydra.sweeper.storage=sqlite:///rel.db", "x=1"]}}})
    pin_storage(cfg, "sqlite:////it's here/rel.db")
    assert cfg.hydra.sweeper.storage == "sqlite:////it's here/rel.db"
    assert list(cfg.hydra.overrides.hydra) == ["x=1", "hydra.sweeper.storage='sqlite:////it\\'s here/rel.db'"]


def test_leaving_the_study_loop_early_fails_its_running_trials(tmp_path):
    import signal

    from prune_lab.errors import Interrupted
    from prune_lab.study.trials import Reserve, settled
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db")
    done, running = study.ask(), study.ask()
    study.tell(done, 1.0)
    reserve = Reserve(str(tmp_path / "s.db"))
    assert reserve.path.stat().st_size == Reserve.SIZE
    with pytest.raises(KeyboardInterrupt), settled(study, [done, running], reserve):
        raise Interrupted(signal.SIGTERM)
    states = [(t.state.name, t.user_attrs.get("failed_because")) for t in study.trials]
    assert states == [("COMPLETE", None), ("FAIL", "interrupted by SIGTERM")]
    with pytest.raises(OSError), settled(study, [study.ask()], reserve):
        raise OSError(28, "No space left on device")
    assert reserve.path is None and not list(tmp_path.glob(".s.db.reserve-*"))   # given back first
    assert study.trials[-1].state.name == "FAIL"
