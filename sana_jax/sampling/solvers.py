"""Solver steps over a pytree state, and the whole denoising loop as one lax.scan.

The model predicts the flow velocity v = noise - x0 at noise level sigma, so x0 = x - sigma * v.
"""
import jax
import jax.numpy as jnp

from sana_jax.sampling.schedules import flow_dpm_schedule, flow_euler_schedule


def _lambda(sigma):  # log-SNR of the flow path x = (1 - sigma) x0 + sigma noise
  return jnp.log(1.0 - sigma) - jnp.log(sigma)


def dpm_step(state, v, sigmas, i, start, num_steps):
  """DPM-Solver++ (2M, midpoint) in the data-prediction form. First order on the first step run
  (`start`; image-to-image starts mid-schedule) and the last; the last lands on sigma = 0 and so
  returns x0."""
  x, prev_x0 = state["x"], state["prev_x0"]
  s, t = sigmas[i], sigmas[i + 1]
  s_prev = sigmas[jnp.maximum(i - 1, 0)]
  x0 = x - s * v
  h = _lambda(t) - _lambda(s)
  alpha_t = 1.0 - t
  decay = jnp.exp(-h) - 1.0
  first = (t / s) * x - alpha_t * decay * x0
  r = (_lambda(s) - _lambda(s_prev)) / h
  second = (t / s) * x - alpha_t * decay * x0 - 0.5 * alpha_t * decay * (x0 - prev_x0) / r
  use_first = (i == start) | (i == num_steps - 1)
  return {"x": jnp.where(use_first, first, second), "prev_x0": x0}


def euler_step(state, v, sigmas, i, start, num_steps):
  return {"x": state["x"] + (sigmas[i + 1] - sigmas[i]) * v, "prev_x0": state["prev_x0"]}


SAMPLERS = {"flow_dpm": (flow_dpm_schedule, dpm_step), "flow_euler": (flow_euler_schedule, euler_step)}


def denoise(velocity_fn, latents, sigmas, timesteps, step_fn, start=0):
  """Runs the solver steps from `start` (a Python int; 0 but for image-to-image, whose latents are
  already at sigmas[start]) to the end in one scan: velocity_fn(x, timestep) -> v (float32, guidance
  applied)."""
  num_steps = timesteps.shape[0]
  x = latents.astype(jnp.float32)

  def body(state, i):
    v = velocity_fn(state["x"], timesteps[i]).astype(jnp.float32)
    return step_fn(state, v, sigmas, i, start, num_steps), None

  state, _ = jax.lax.scan(body, {"x": x, "prev_x0": jnp.zeros_like(x)}, jnp.arange(start, num_steps))
  return state["x"]
