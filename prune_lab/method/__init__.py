"""Method family (twin of conf/method/*.yaml): method=<option> is prune_lab/method/<option>.py.

`structured` (default) is the importance + allocator + reconstruct + executor family; `sparsegpt`,
`wanda` and `magnitude` are layer methods of the unstructured family (base.py) for the sequential
engine. Each declares its `family`, which picks the recipe (prune_lab/recipes)."""
from .base import Unstructured
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .structured import Structured
from .wanda import Wanda

__all__ = ["Magnitude", "SparseGPT", "Structured", "Unstructured", "Wanda"]
