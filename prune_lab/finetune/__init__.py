"""Recovery after pruning (twin of conf/finetune/*.yaml): none (base.py), lora, full, distill.

`base.py` holds the lifecycle every trainer shares (windows, loop, loss curve); `distill.py` adds the
teacher (the dense model, taken before compression) and `kd.py` the distillation losses (pure tensor math).
"""
from .base import LossCurve, NoFinetune, Trainer, WindowSampler
from .distill import Distill, Teacher
from .full import Full
from .lora import LoRA

__all__ = ["Distill", "Full", "LoRA", "LossCurve", "NoFinetune", "Teacher", "Trainer", "WindowSampler"]
