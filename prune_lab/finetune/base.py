"""The lifecycle every recovery shares (finetune=none is NoFinetune here): seeded windows, the loop, the curve.

Every trainer sees random seq_len windows of the train stream, fixed by the seed, and writes the
loss curve (loss.csv + loss.png) to the run dir. The model is trained in place and stays a plain
Hugging Face model with its pruned shapes. A trainer's options (lora.py, full.py, distill.py) choose what
is trained (`wrap`/`unwrap`) and on what loss (`loss`).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_text_atomic
from ..errors import PruneLabError


class NoFinetune:
    """No recovery: the pruned model is evaluated as is."""

    enabled = False
    needs_teacher = False
    split = None

    def check_model(self, model) -> None:
        pass

    def __call__(self, model, tokenizer, stream, seed: int = 0, run_dir=None, **context) -> dict:
        return {}


class WindowSampler:
    """Batches of seq_len windows: each epoch cuts the stream at a random offset and shuffles."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if len(stream) < (batch_size + 1) * seq_len:
            raise PruneLabError(f"finetune split has {len(stream)} tokens, too few for "
                                f"batch_size={batch_size} x seq_len={seq_len}")
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def steps_per_epoch(self) -> int:
        return (len(self.stream) - self.seq_len) // self.seq_len // self.batch_size

    def __iter__(self):
        while True:
            offset = int(torch.randint(0, self.seq_len, (1,), generator=self.generator))
            n = (len(self.stream) - offset) // self.seq_len
            windows = self.stream[offset:offset + n * self.seq_len].view(n, self.seq_len)
            order = torch.randperm(n, generator=self.generator)
            for step in range(self.steps_per_epoch):
                yield windows[order[step * self.batch_size:(step + 1) * self.batch_size]]


class LossCurve:
    """Per-step loss and learning rate, written as loss.csv and loss.png."""

    def __init__(self):
        self.rows: list[tuple[int, float, float]] = []

    def add(self, step: int, loss: float, lr: float) -> None:
        self.rows.append((step, loss, lr))

    def tail_mean(self, n: int = 10) -> float:
        tail = [loss for _, loss, _ in self.rows[-n:]]
        return sum(tail) / len(tail)

    def save(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        lines = ["step,loss,lr"] + [f"{s},{loss:.6f},{lr:.6g}" for s, loss, lr in self.rows]
        write_text_atomic(run_dir / "loss.csv", "\n".join(lines) + "\n")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps, losses = [r[0] for r in self.rows], [r[1] for r in self.rows]
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="step loss")
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of last {k}")
        ax.set(xlabel="step", ylabel="training loss (nats/token)", title="Recovery fine-tuning")
        ax.legend()
        fig.tight_layout()
        with atomic_path(run_dir / "loss.png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)


class Trainer:
    """The shared loop: AdamW, linear warmup then cosine decay, gradient clipping."""

    method = "train"
    enabled = True
    needs_teacher = False       # distill: the recipe keeps the dense model's teacher before compressing

    def __init__(self, lr: float = 2e-4, max_steps: int = 200, epochs: int | None = None,
                 batch_size: int = 8, seq_len: int = 256, split: str = "train",
                 weight_decay: float = 0.0, warmup_steps: int = 20, grad_clip: float = 1.0):
        if lr <= 0 or batch_size < 1 or seq_len < 2 or warmup_steps < 0 or grad_clip < 0:
            raise PruneLabError("finetune needs lr > 0, batch_size >= 1, seq_len >= 2, "
                                "warmup_steps >= 0, grad_clip >= 0 (0 = off)")
        if (epochs is None and max_steps < 1) or (epochs is not None and epochs < 1):
            raise PruneLabError("finetune needs max_steps >= 1 or epochs >= 1")
        self.lr, self.max_steps, self.epochs = lr, max_steps, epochs
        self.batch_size, self.seq_len, self.split = batch_size, seq_len, split
        self.weight_decay, self.warmup_steps, self.grad_clip = weight_decay, warmup_steps, grad_clip

    def check_model(self, model: nn.Module) -> None:
        """What the loaded model must offer (LoRA's target modules): checked right after loading."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train (its trainable parameters are optimised)."""
        return model

    def unwrap(self, trained: nn.Module, model: nn.Module) -> None:
        """Fold the training back into `model`, in place."""

    def loss(self, trained: nn.Module, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """The step's loss and its named parts (logged as first_<part> / final_<part>): next-token CE."""
        return trained(input_ids=batch, labels=batch).loss, {}

    @contextmanager
    def session(self, model: nn.Module, **context):
        """Set-up around the loop (distill: the teacher and the hidden-state hooks)."""
        yield

    def sampler(self, stream: torch.Tensor, seed: int) -> tuple[WindowSampler, int]:
        """The seeded windows and the number of steps: the same batches for the same seed."""
        sampler = WindowSampler(stream, self.seq_len, self.batch_size, seed)
        return sampler, self.epochs * sampler.steps_per_epoch if self.epochs else self.max_steps

    def __call__(self, model, tokenizer, stream, seed: int = 0, run_dir=None, **context) -> dict:
        torch.manual_seed(seed)   # LoRA init and dropout
        sampler, steps = self.sampler(stream, seed)
        device, requires_grad = model.device, {n: p.requires_grad for n, p in model.named_parameters()}
        trained = self.wrap(model)
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor(steps))
        curve, parts, start = LossCurve(), {}, time.time()
        trained.train()
        bar = tqdm(zip(range(steps), sampler), total=steps, desc=f"finetune {self.method}", leave=False)
        with self.session(model, **context):
            for step, batch in bar:
                loss, named = self.loss(trained, batch.to(device), step)
                if not torch.isfinite(loss):
                    raise PruneLabError(f"finetune loss became {loss.item()} at step {step}: lower finetune.lr")
                loss.backward()
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                curve.add(step + 1, loss.item(), schedule.get_last_lr()[0])
                for k, v in named.items():
                    parts.setdefault(k, []).append(v)
                schedule.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
        self.unwrap(trained, model)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))
        model.eval()
        if run_dir is not None:
            curve.save(Path(run_dir))
        return {"method": self.method, "steps": steps, "tokens": steps * self.batch_size * self.seq_len,
                "first_loss": curve.rows[0][1], "final_loss": curve.tail_mean(),
                "trainable_params": sum(p.numel() for p in params),
                **{f"{end}_{k}": v for k, vs in parts.items()
                   for end, v in (("first", vs[0]), ("final", sum(vs[-10:]) / len(vs[-10:])))},
                "time_s": round(time.time() - start, 2)}

    def lr_factor(self, steps: int):
        warmup = min(self.warmup_steps, steps - 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * progress))
        return factor
