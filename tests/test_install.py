"""A real install: build the wheel, install it into a fresh venv that reuses the installed torch etc.,
and run the app from another directory — console script, `python -m`, overlays, a user --config-dir."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, write_small_corpus

pytestmark = pytest.mark.slow
SKIP = shutil.ignore_patterns(".git", ".venv", ".worktrees", "outputs", "multirun", "build", "dist",
                              "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    src = shutil.copytree(REPO, tmp / "src", ignore=SKIP)        # build from a copy: no build/ in the checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=300)
    wheel, = (tmp / "dist").glob("prune_lab-*.whl")
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # torch, transformers, hydra ... from this interpreter's site-packages, as plain path entries (their
    # .pth files, among them the editable prune_lab's, are not processed)
    Path(purelib, "_reuse.pth").write_text("\n".join(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    return env_dir


def in_venv(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PRUNE_LAB_CACHE": str(cwd / "cache")}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_wheel_runs_from_any_directory(venv, tmp_path):
    python, script = venv / "bin" / "python", venv / "bin" / "prune-lab"
    where = in_venv(venv, str(python), "-c", "import prune_lab; print(prune_lab.__file__)", cwd=tmp_path).stdout
    assert where.startswith(str(venv)), where                      # the wheel, not the checkout

    assert "layer_importance  activation*" in in_venv(venv, str(script), "--help", cwd=tmp_path).stdout
    job = in_venv(venv, str(python), "-m", "prune_lab", "hparams_search=optuna_distribution", "--cfg", "job",
                  cwd=tmp_path).stdout
    assert "prune_lab.allocator.Layerwise" in job and "attn_mlp" in job

    # the user's own configs next to the packaged ones: a model and a dataset, used by name
    write_small_corpus(tmp_path)
    user = tmp_path / "my_conf"
    (user / "model").mkdir(parents=True)
    (user / "data").mkdir()
    (user / "model" / "my_tiny.yaml").write_text(
        "defaults:\n  - /schema/model/random@_here_\n  - _self_\nnum_hidden_layers: 2\ndevice: cpu\n")
    (user / "data" / "my_text.yaml").write_text(
        f"defaults:\n  - /schema/data/text@_here_\n  - _self_\ntrain: {tmp_path}/train.txt\ntest: {tmp_path}/test.txt\n")
    proc = in_venv(venv, str(script), "--config-dir", str(user), "model=my_tiny", "data=my_text",
                   "eval.ppl.datasets=[data,my_text]", "calibration.n_samples=4", "calibration.seq_len=32",
                   "eval.ppl.seq_len=32", "eval.ppl.max_windows=4", "output.plots=false", cwd=tmp_path)
    run_dir, = (tmp_path / "outputs").glob("*/*")
    assert f"run dir: {run_dir.resolve()} (took " in proc.stdout + proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["versions"]["git"] is None
    assert metrics["model"]["dense"]["num_layers"] == 2
    assert metrics["pruned"]["ppl/data"] == metrics["pruned"]["ppl/my_text"]
