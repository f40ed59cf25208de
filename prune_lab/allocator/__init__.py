"""Budget allocators (twin of conf/allocator/*.yaml). Each turns scores into a PruningPlan."""
from .base import Allocator, parse_distribution
from .depth import Depth
from .global_table import Global, unit_table
from .layerwise import Layerwise
from .uniform import Uniform

__all__ = ["Allocator", "Uniform", "Layerwise", "Global", "Depth", "unit_table", "parse_distribution"]
