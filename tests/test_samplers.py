"""Solver steps against diffusers' schedulers, step by step, with a fixed pseudo-model."""
import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sana_jax.sampling import SAMPLERS, denoise


def fake_velocity(x, t):
  """A smooth nonlinear stand-in for the DiT, the same in numpy and jax."""
  return np.tanh(x) * 0.7 + 0.01 * t / 1000.0 - 0.3 * x


def reference(name, steps, shift, x):
  if name == "flow_dpm":
    sched = diffusers.DPMSolverMultistepScheduler(flow_shift=shift, use_flow_sigmas=True,
                                                  prediction_type="flow_prediction")
  else:
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
  sched.set_timesteps(steps)
  sample = torch.from_numpy(x)
  seen_t = []
  for t in sched.timesteps:
    seen_t.append(float(t))
    v = torch.from_numpy(fake_velocity(sample.numpy(), float(t)).astype(np.float32))
    sample = sched.step(v, t, sample, return_dict=False)[0]
  return sample.numpy(), np.array(seen_t, np.float32), sched.sigmas.numpy()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_matches_diffusers(name, steps):
  shift = 3.0
  x = np.random.default_rng(0).standard_normal((2, 5, 3, 4)).astype(np.float32)
  expected, ref_t, ref_sigmas = reference(name, steps, shift, x)
  schedule, step = SAMPLERS[name]
  sigmas, timesteps = schedule(steps, shift)
  np.testing.assert_allclose(timesteps, ref_t, rtol=1e-6, atol=1e-4)
  np.testing.assert_allclose(sigmas, ref_sigmas, rtol=1e-6, atol=1e-7)
  got = denoise(lambda x, t: jnp.tanh(x) * 0.7 + 0.01 * t / 1000.0 - 0.3 * x, jnp.asarray(x), jnp.asarray(sigmas),
                jnp.asarray(timesteps), step)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
