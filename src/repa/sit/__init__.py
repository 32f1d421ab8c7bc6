"""The reference SiT recipe of REPA: model, interpolant transport and samplers (REPA_FACTS section 3).

- :mod:`repa.sit.models`: ``SiT`` and the size factories ``SiT_models`` / ``create_sit``.
- :mod:`repa.sit.transport`: linear and cosine paths, training-time sampling, velocity loss.
- :mod:`repa.sit.sampling`: Euler / Heun ODE and Euler-Maruyama SDE samplers with CFG.
- :mod:`repa.sit.step`: the one training step (loss, backward, clip, optimizer, EMA) that
  ``repa train`` and the benchmarks run.
- :mod:`repa.sit.official`: the official REPA code's checkpoints (released ``last.pt``,
  train.py checkpoints, legacy ones) for sampling, probing, fine-tuning, and their projectors
  for a ``REPARegularizer`` (``load_official_projectors``).

The training and sampling programs (``repa train``, ``repa sample``) are built on these modules.
"""

from .models import SiT, SiT_models, create_sit, list_sit_models
from .sampling import PAPER_FID_SETTING, guided_velocity
from .sampling import sample as sample_images  # `repa.sit.sample` is the `repa sample` command module
from .step import StepBatch, StepRecord, step_losses, training_step
from .transport import CosinePath, LinearPath, Path, get_path, sample_time, velocity_loss

__all__ = [
    "SiT",
    "SiT_models",
    "create_sit",
    "list_sit_models",
    "Path",
    "LinearPath",
    "CosinePath",
    "get_path",
    "sample_time",
    "velocity_loss",
    "sample_images",
    "guided_velocity",
    "PAPER_FID_SETTING",
    "StepBatch",
    "StepRecord",
    "step_losses",
    "training_step",
]
