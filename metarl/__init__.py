"""metarl: discovering reinforcement-learning objectives by meta-gradient descent.

Public entry points:

* `load_objective(path)` and `save_objective(...)`: learned objectives on disk.
* `ParametricObjective`: the actor-critic loss with learned scalars.
* `LearnedTargetsObjective`: targets from a backward recurrent meta-network.
* `make_trajectory(...)`: a user's own rollout, packed for `LoadedObjective.loss`.
* `metarl.metagrad`: differentiable unrolls of inner updates (MixFlow-MG and
  plain autodiff).
* `python -m metarl.train`: the meta-training command.
"""

__version__ = "0.1.0"

from metarl.export import (
    LoadedObjective,
    ObjectiveFileError,
    load_objective,
    save_objective,
)
from metarl.learned_targets import LearnedTargetsObjective
from metarl.objectives import ParametricObjective
from metarl.trajectory import make_trajectory

__all__ = [
    "LearnedTargetsObjective",
    "LoadedObjective",
    "ObjectiveFileError",
    "ParametricObjective",
    "__version__",
    "load_objective",
    "make_trajectory",
    "save_objective",
]
