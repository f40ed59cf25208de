"""Unit importance criteria (twin of conf/importance/*.yaml): importance=<option> is
prune_lab/importance/<option>.py (taylor and taylor_2nd share taylor.py); `_target_`s name this face."""
from .base import Importance
from .file import FromFile
from .flap import Flap
from .magnitude import Magnitude
from .obs import ObsError
from .random import Random
from .taylor import Taylor
from .wanda import Wanda

__all__ = ["Importance", "FromFile", "Flap", "Magnitude", "ObsError", "Random", "Taylor", "Wanda"]
