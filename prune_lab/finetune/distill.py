"""finetune=distill: recovery that learns the dense model's next-token distributions (logit KD), LoRA or full.

loss = T²·KL(teacher ‖ student) at T = `temperature` + `ce_weight`·CE + `hidden_weight`·MSE of the output
hidden states of `hidden_layers` (dense layer indices; those the student still has, mapped past removed
layers). The teacher is the dense model as loaded, taken by the recipe *before* compression (`teacher`):
a frozen copy, or — with `teacher_topk=k` and no hidden term — only its top-k logits of every training
batch, computed once on CPU memory before compression, so no second model is kept. With `teacher_topk` the
KL is over the teacher's top-k tokens, both distributions renormalised on them (kd.kl_topk).

`teacher_correction_steps=n` (Minitron's teacher correction): before it teaches, the teacher's copy is
fine-tuned n CE-LoRA steps on the training split (the distill job's r/alpha/dropout/targets/batch, LoRA's
lr, seed + 1), so a teacher trained on other text first adapts to the data the student is healed on;
the pruned student still starts from the dense model as loaded.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.adapter import decoder_layers
from ..errors import PruneLabError
from . import kd
from .base import Trainer
from .full import Full
from .lora import LoRA

MODES = {"lora": (LoRA, 2e-3), "full": (Full, 5e-5)}


@dataclass
class Teacher:
    """The dense model's side of distillation: a frozen copy, or its precomputed top-k logits per step."""
    num_layers: int
    model: nn.Module | None = None
    batches: list[torch.Tensor] | None = None         # the training batches the top-k belong to
    topk: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # per step: values, int32 indices (CPU)
    correction: dict | None = None                    # teacher_correction_steps: its CE-LoRA run's record


class Distill(Trainer):
    """Knowledge distillation from the dense model; `mode` lora (default) or full trains as those do."""

    method = "distill"
    needs_teacher = True

    def __init__(self, mode: str = "lora", temperature: float = 1.0, ce_weight: float = 0.0,
                 hidden_weight: float = 0.0, hidden_layers: list[int] | None = None, teacher_topk: int | None = None,
                 teacher_correction_steps: int = 0, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                 target_modules: list[str] | None = None, lr: float | None = None, **train):
        if mode not in MODES:
            raise PruneLabError(f"finetune.mode={mode}: finetune=distill trains by {' or '.join(MODES)}")
        cls, default_lr = MODES[mode]
        lr = default_lr if lr is None else lr
        super().__init__(lr=lr, **train)
        self.adapter = LoRA(r, alpha, dropout, target_modules, lr=lr, **train) if mode == "lora" else Full(lr, **train)
        if not temperature > 0 or ce_weight < 0 or hidden_weight < 0 or (teacher_topk is not None and teacher_topk < 1):
            raise PruneLabError("finetune=distill needs temperature > 0, ce_weight >= 0, hidden_weight >= 0 "
                                "and teacher_topk >= 1 (null: the whole vocabulary)")
        if teacher_correction_steps < 0:
            raise PruneLabError(f"finetune.teacher_correction_steps={teacher_correction_steps}: 0 (off) or more steps")
        if any(i < 0 for i in hidden_layers or ()):
            raise PruneLabError(f"finetune.hidden_layers {list(hidden_layers)}: dense layer indices are >= 0")
        self.mode, self.temperature, self.ce_weight, self.hidden_weight = mode, temperature, ce_weight, hidden_weight
        self.hidden_layers = None if hidden_layers is None else list(hidden_layers)
        self.teacher_topk = teacher_topk
        self.correction = None if not teacher_correction_steps else LoRA(
            r, alpha, dropout, target_modules, lr=MODES["lora"][1], **{**train, "max_steps": teacher_correction_steps,
                                                                        "epochs": None})
        self._run = None

    def check_model(self, model: nn.Module) -> None:
        self.adapter.check_model(model)
        n, vocab = len(decoder_layers(model)), model.get_output_embeddings().weight.shape[0]
        if any(i >= n for i in self.hidden_layers or ()):
            raise PruneLabError(f"finetune.hidden_layers {self.hidden_layers} names a layer the dense model lacks "
                                f"(it has {n} layers: 0..{n - 1})")
        if self.teacher_topk is not None and self.teacher_topk > vocab:
            raise PruneLabError(f"finetune.teacher_topk={self.teacher_topk} exceeds the vocabulary ({vocab})")

    def wrap(self, model: nn.Module) -> nn.Module:
        return self.adapter.wrap(model)

    def unwrap(self, trained: nn.Module, model: nn.Module) -> None:
        self.adapter.unwrap(trained, model)

    @property
    def precomputes(self) -> bool:
        return self.teacher_topk is not None and not self.hidden_weight

    def teacher(self, model: nn.Module, stream: torch.Tensor, seed: int) -> Teacher:
        """Called on the dense model before compression: its frozen copy, or its top-k logits for exactly
        the batches training will draw (the same seeded sampler); corrected first with teacher_correction_steps."""
        num_layers = len(decoder_layers(model))
        if self.correction is not None or not self.precomputes:
            model = copy.deepcopy(model)              # the dense model the recipe prunes stays as loaded
        correction = None if self.correction is None else self.correction(model, None, stream, seed=seed + 1)
        if not self.precomputes:
            return Teacher(num_layers, model=model.eval().requires_grad_(False), correction=correction)
        sampler, steps = self.sampler(stream, seed)
        training, batches, topk = model.training, [], []
        model.eval()
        with torch.no_grad():
            for _, batch in zip(range(steps), sampler):
                values, indices = model(input_ids=batch.to(model.device)).logits.topk(self.teacher_topk, dim=-1)
                batches.append(batch)
                topk.append((values.float().cpu(), indices.to(torch.int32).cpu()))
        model.train(training)
        return Teacher(num_layers, batches=batches, topk=topk, correction=correction)

    @contextmanager
    def session(self, model: nn.Module, teacher: Teacher | None = None, removed_layers=()):
        if teacher is None:
            raise RuntimeError("finetune=distill runs with the dense model's Teacher (recipes keep it)")
        mapping = kd.layer_map(teacher.num_layers, list(removed_layers))
        wanted = range(teacher.num_layers) if self.hidden_layers is None else self.hidden_layers
        pairs = [(d, mapping[d]) for d in wanted if d in mapping] if self.hidden_weight else []
        states: dict[tuple[str, int], torch.Tensor] = {}
        handles = []

        def capture(key):
            def hook(module, args, output):
                states[key] = output[0] if isinstance(output, tuple) else output
            return hook
        for dense, student in pairs:
            handles.append(decoder_layers(teacher.model)[dense].register_forward_hook(capture(("t", dense))))
            handles.append(decoder_layers(model)[student].register_forward_hook(capture(("s", dense))))
        self._run = (teacher, pairs, states)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._run = None
            self.hidden_layers_used = [d for d, _ in pairs]

    def loss(self, trained: nn.Module, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        teacher, pairs, states = self._run
        out = trained(input_ids=batch, labels=batch if self.ce_weight else None)
        if teacher.topk is not None:
            if not torch.equal(teacher.batches[step], batch.cpu()):
                raise RuntimeError(f"finetune=distill: step {step}'s batch is not the one the teacher saw")
            values, indices = teacher.topk[step]
            kl = kd.kl_topk(out.logits, values.to(batch.device), indices.to(batch.device), self.temperature)
        else:
            with torch.no_grad():
                target = teacher.model(input_ids=batch).logits
            kl = (kd.kl(out.logits, target, self.temperature) if self.teacher_topk is None else
                  kd.kl_topk(out.logits, *target.topk(self.teacher_topk, dim=-1), self.temperature))
        loss, parts = kl, {"kl": kl.item()}
        if self.ce_weight:
            loss = loss + self.ce_weight * out.loss
            parts["ce"] = out.loss.item()
        if pairs:
            mse = kd.hidden_mse([(states[("s", d)], states[("t", d)]) for d, _ in pairs])
            loss = loss + self.hidden_weight * mse
            parts["hidden_mse"] = mse.item()
        return loss, parts

    def __call__(self, model, tokenizer, stream, seed: int = 0, run_dir=None, **context) -> dict:
        teacher = context.get("teacher")
        out = super().__call__(model, tokenizer, stream, seed, run_dir, **context)
        if teacher is not None and teacher.correction is not None:
            c = teacher.correction
            out["teacher_correction"] = {k: c[k] for k in ("steps", "tokens", "first_loss", "final_loss", "time_s")}
        return {**out, "mode": self.mode, "temperature": self.temperature, "teacher_topk": self.teacher_topk,
                "teacher_precomputed": self.precomputes, "hidden_layers_used": self.hidden_layers_used}
