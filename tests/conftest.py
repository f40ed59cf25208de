"""Shared fixtures: Hydra compose of the real configs, tiny random models of every architecture."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from prune_lab import schema  # noqa: E402
from prune_lab.model import ASSETS, RandomModel  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "prune_lab" / "conf"
SHARED = REPO.parent / "shared"
LAB_MODEL = ASSETS / "lab-llama"

# Tiny shapes per supported family: Llama/Mistral 4:1 GQA, Qwen2 7:1 with q/k/v bias, Qwen3 q/k norms.
TINY = {
    "llama": dict(arch="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    "mistral": dict(arch="mistral", hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    "qwen2": dict(arch="qwen2", hidden_size=112, num_attention_heads=14, num_key_value_heads=2, head_dim=8),
    "qwen3": dict(arch="qwen3", hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    # OPT: multi-head attention (GQA with G=1), q/k/v/out_proj biases, fc1/fc2 MLP without a gate
    "opt": dict(arch="opt", hidden_size=64, num_attention_heads=8, num_key_value_heads=8, head_dim=8),
}
ARCHS = ["llama", "mistral", "qwen2", "qwen3"]   # the gated-MLP families every suite test covers
ALL_ARCHS = [*ARCHS, "opt"]                      # + OPT, where the feature supports it

schema.register()


def compose_job(*overrides: str):
    """Compose conf/config.yaml with overrides, exactly as the CLI does."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=list(overrides))


def tiny_model(arch: str = "llama", layers: int = 3, intermediate: int = 48, seed: int = 0,
               attn_implementation: str = "sdpa"):
    shape = dict(TINY[arch], num_hidden_layers=layers, intermediate_size=intermediate, seed=seed)
    return RandomModel(**shape, device="cpu", attn_implementation=attn_implementation).build()


def tiny_overrides(arch: str = "llama", tmp_path=None) -> list[str]:
    """Overrides that shrink the default job to a tiny random model and a few windows."""
    ov = ["model=random", *(f"model.{k}={v}" for k, v in TINY[arch].items()),
          "model.num_hidden_layers=3", "model.intermediate_size=48",
          "calibration.n_samples=4", "calibration.seq_len=32", "calibration.batch_size=2",
          "eval.ppl.seq_len=32", "eval.ppl.max_windows=4", "eval.ppl.batch_size=4"]
    if tmp_path is not None:
        ov.append(f"cache.dir={tmp_path}/cache")
    return ov


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def lab_model():
    from prune_lab.model import EmbeddedModel
    return EmbeddedModel(device="cpu").load()


def needs_shared():
    return pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (lab models and data) is absent")


def write_small_corpus(directory) -> Path:
    """train.txt/test.txt cut from the bundled test split, so a run tokenises little."""
    import gzip
    with gzip.open(ASSETS / "wiki-vital-en" / "test.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read(60_000)
    (directory / "train.txt").write_text(text[:40_000], encoding="utf-8")
    (directory / "test.txt").write_text(text[40_000:], encoding="utf-8")
    return directory


def text_job(tmp_path, *extra: str):
    """The tiny llama job on the small local corpus (written into tmp_path once), cache under tmp_path."""
    if not (tmp_path / "train.txt").exists():
        write_small_corpus(tmp_path)
    return compose_job(*tiny_overrides("llama", tmp_path), "data=text", f"data.train={tmp_path}/train.txt",
                       f"data.test={tmp_path}/test.txt", *extra)


@torch.no_grad()
def lively(model, seed: int = 0):
    """Re-draw weights at O(1) logit scale so that zeroing the wrong unit shows up far above 1e-5."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.copy_(1 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.2 * noise)
        elif "embed" in name:
            p.copy_(noise)
        else:
            p.copy_(noise / p.shape[1] ** 0.5)
    return model


def left_padded(batch: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones_like(batch)
    for row, n in enumerate(pads):
        batch[row, :n], mask[row, :n] = 0, 0
    return batch, mask


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prune_lab", *args]


def cli_env(cache=None, studies=None, **extra: str) -> dict:
    """The environment of a CLI job: offline, with its own score cache and study dir when given."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    if cache is not None:
        env["PRUNE_LAB_CACHE"] = str(cache)
    if studies is not None:
        env["PRUNE_LAB_STUDIES"] = str(studies)
    return env


def run_cli(*args: str, run_dir=None, cache=None, studies=None, cwd=REPO, env=None, check: bool = False,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m prune_lab` in a subprocess (for what only the CLI does: exit codes, stderr lines): the
    suite's one CLI launcher (start_cli for a process to signal or run beside others)."""
    if run_dir is not None:
        args = (*args, f"hydra.run.dir={run_dir}")
    proc = subprocess.run(cli_command(*args), cwd=cwd, env=env or cli_env(cache, studies), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start_cli(*args: str, cwd, env, **popen) -> subprocess.Popen:
    """The CLI as a background process (to kill, to run as parallel workers)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(cli_command(*args), cwd=cwd, env=env, **popen)


def tokens(n: int = 2, length: int = 16, vocab: int = 8192, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
