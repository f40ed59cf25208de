"""Weight quantization (twin of conf/quant/*.yaml): quant=<option> is prune_lab/quant/<option>.py
(none = the contract in base.py); grid.py and allocation.py hold the tensor math."""
from .base import NoQuant, Quantizer
from .mixed import Mixed
from .uniform import Uniform

__all__ = ["Mixed", "NoQuant", "Quantizer", "Uniform"]
