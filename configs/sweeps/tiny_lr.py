"""Learning rate x logit-normal std on the tiny config: four short CPU runs.

  python -m sana_jax.training.sweep configs/sweeps/tiny_lr.py --workdir /tmp/sweep [--print]
"""
from sana_jax.training.sweep import product

BASE = "configs/tiny.py:steps=10"


def get_sweep():
  return product(**{"optim.lr": [1e-3, 3e-4], "objective.logit_std": [1.0, 1.3]})
