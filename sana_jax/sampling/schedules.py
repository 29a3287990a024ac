"""Noise levels (sigmas) and model timesteps for flow-matching sampling, as diffusers builds them.

Each function returns (sigmas [steps + 1] float32 ending at 0, timesteps [steps] float32).
"""
import numpy as np

TRAIN_STEPS = 1000


def shifted(sigma, shift):
  """Resolution-dependent time shift: sigma -> shift * sigma / (1 + (shift - 1) * sigma)."""
  return shift * sigma / (1 + (shift - 1) * sigma)


def flow_dpm_schedule(steps, shift):
  """Flow-DPM-Solver (diffusers' DPMSolverMultistepScheduler, use_flow_sigmas=True): a linear grid
  in 1 - sigma, shifted; the model sees the timesteps truncated to integers, as diffusers casts them."""
  alphas = np.linspace(1, 1 / TRAIN_STEPS, steps + 1)
  sigmas = np.flip(shifted(1.0 - alphas, shift))[:-1].copy()
  timesteps = (sigmas * TRAIN_STEPS).astype(np.int64).astype(np.float32)
  return np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps


def flow_euler_schedule(steps, shift):
  """Flow-Euler (diffusers' FlowMatchEulerDiscreteScheduler): the grid's end is the shifted smallest
  training sigma and the grid is shifted again, exactly as that scheduler does."""
  sigma_min = np.float32(shifted(np.float32(1 / TRAIN_STEPS), np.float32(shift)))
  grid = np.linspace(1.0 * TRAIN_STEPS, float(sigma_min) * TRAIN_STEPS, steps) / TRAIN_STEPS
  sigmas = shifted(grid, shift).astype(np.float32)
  return np.concatenate([sigmas, [0.0]]).astype(np.float32), sigmas * np.float32(TRAIN_STEPS)
