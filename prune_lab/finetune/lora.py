"""finetune=lora: peft LoRA adapters on the decoder projections, merged back into a plain model."""
from __future__ import annotations

import torch.nn as nn

from ..core.adapter import decoder_linear_names
from ..errors import PruneLabError
from .base import Trainer


class LoRA(Trainer):
    """peft LoRA on the named Linear modules, merged back with merge_and_unload.

    target_modules=None (the default): the architecture's decoder projections (Llama, Qwen, Mistral:
    q/k/v/o_proj, gate/up/down_proj; OPT: q/k/v_proj, out_proj, fc1, fc2)."""

    method = "lora"

    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                 target_modules: list[str] | tuple[str, ...] | None = None, lr: float = 2e-3, **train):
        super().__init__(lr=lr, **train)
        if r < 1 or alpha <= 0 or not 0 <= dropout < 1 or (target_modules is not None and not target_modules):
            raise PruneLabError("finetune=lora needs r >= 1, alpha > 0, 0 <= dropout < 1 "
                                "and at least one target module (null: the architecture's projections)")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = None if target_modules is None else list(target_modules)

    def targets(self, model: nn.Module) -> list[str]:
        return self.target_modules if self.target_modules is not None else decoder_linear_names(model)

    def check_model(self, model: nn.Module) -> None:
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = [t for t in self.targets(model) if t not in names]
        if unknown:
            raise PruneLabError(f"finetune.target_modules {unknown} match no Linear layer in the model "
                                f"(it has: {', '.join(sorted(names))})")

    check_targets = check_model

    def wrap(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        self.check_model(model)
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.targets(model), bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, config)

    def unwrap(self, trained: nn.Module, model: nn.Module) -> None:
        merged = trained.merge_and_unload()
        if merged is not model:   # peft edits the model in place; the pipeline keeps its reference
            raise RuntimeError("peft merge_and_unload returned a new model object")
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in model.__dict__:
                delattr(model, attr)
