"""Budget allocators (twin of conf/allocator/*.yaml). Each turns scores into a PruningPlan."""
from .align import align_plan, check_alignment
from .base import Allocator, parse_distribution
from .depth import Depth
from .global_table import Global, unit_table
from .layerwise import Layerwise
from .search import Search
from .uniform import Uniform
from .uniform_shape import UniformShape

__all__ = ["Allocator", "Uniform", "UniformShape", "Layerwise", "Global", "Depth", "Search", "unit_table",
           "parse_distribution", "align_plan", "check_alignment"]
