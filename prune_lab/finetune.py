"""Recovery after pruning (twin of conf/finetune/*.yaml): none, LoRA (merged back), full.

Both trainers see random seq_len windows of the train stream, fixed by the seed, and write the
loss curve (loss.csv + loss.png) to the run dir. The model is trained in place and stays a plain
Hugging Face model with its pruned shapes.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .atomic import atomic_path, write_text_atomic
from .core.adapter import DECODER_LINEARS
from .errors import PruneLabError


class NoFinetune:
    """No recovery: the pruned model is evaluated as is."""

    enabled = False
    split = None

    def __call__(self, model, tokenizer, stream, seed: int = 0, run_dir=None) -> dict:
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

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train (its trainable parameters are optimised)."""
        return model

    def unwrap(self, trained: nn.Module, model: nn.Module) -> None:
        """Fold the training back into `model`, in place."""

    def __call__(self, model, tokenizer, stream, seed: int = 0, run_dir=None) -> dict:
        torch.manual_seed(seed)   # LoRA init and dropout
        sampler = WindowSampler(stream, self.seq_len, self.batch_size, seed)
        steps = self.epochs * sampler.steps_per_epoch if self.epochs else self.max_steps
        device, requires_grad = model.device, {n: p.requires_grad for n, p in model.named_parameters()}
        trained = self.wrap(model)
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor(steps))
        curve, start = LossCurve(), time.time()
        trained.train()
        bar = tqdm(zip(range(steps), sampler), total=steps, desc=f"finetune {self.method}", leave=False)
        for step, batch in bar:
            batch = batch.to(device)
            loss = trained(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise PruneLabError(f"finetune loss became {loss.item()} at step {step}: lower finetune.lr")
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.add(step + 1, loss.item(), schedule.get_last_lr()[0])
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
                "time_s": round(time.time() - start, 2)}

    def lr_factor(self, steps: int):
        warmup = min(self.warmup_steps, steps - 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * progress))
        return factor


class Full(Trainer):
    """Full fine-tuning: every parameter, AdamW."""

    method = "full"

    def __init__(self, lr: float = 5e-5, **train):
        super().__init__(lr=lr, **train)

    def wrap(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model


class LoRA(Trainer):
    """peft LoRA on the named Linear modules, merged back with merge_and_unload."""

    method = "lora"

    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                 target_modules: list[str] | tuple[str, ...] = tuple(DECODER_LINEARS), lr: float = 2e-3,
                 **train):
        super().__init__(lr=lr, **train)
        if r < 1 or alpha <= 0 or not 0 <= dropout < 1 or not target_modules:
            raise PruneLabError("finetune=lora needs r >= 1, alpha > 0, 0 <= dropout < 1 "
                                "and at least one target module")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = list(target_modules)

    def check_targets(self, model: nn.Module) -> None:
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = [t for t in self.target_modules if t not in names]
        if unknown:
            raise PruneLabError(f"finetune.target_modules {unknown} match no Linear layer in the model "
                                f"(it has: {', '.join(sorted(names))})")

    def wrap(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        self.check_targets(model)
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules, bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, config)

    def unwrap(self, trained: nn.Module, model: nn.Module) -> None:
        merged = trained.merge_and_unload()
        if merged is not model:   # peft edits the model in place; the pipeline keeps its reference
            raise RuntimeError("peft merge_and_unload returned a new model object")
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in model.__dict__:
                delattr(model, attr)
