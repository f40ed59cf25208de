"""Layer importance (twin of conf/layer_importance/*.yaml): layer_importance=<option> is
prune_lab/layer_importance/<option>.py; `_target_`s name this face."""
from .activation import Activation
from .base import LayerImportance, bypassed
from .file import FromFile
from .removal import Removal

__all__ = ["Activation", "FromFile", "LayerImportance", "Removal", "bypassed"]
