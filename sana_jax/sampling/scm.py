"""Sana-Sprint's few-step sampler: sCM consistency steps in TrigFlow time, as pure functions.

TrigFlow places the sample at angle s in [0, pi/2]: x = cos(s) x0 + sin(s) z with z ~ N(0, sigma_data^2).
Each step converts s to flow time t = sin(s) / (cos(s) + sin(s)), calls the flow-trained model at t
(in [0, 1], not x1000) on the input rescaled to the flow path's scale, turns its velocity back into the
TrigFlow derivative F, predicts x0 = cos(s) x - sin(s) F, and re-noises x0 to the next angle with
fresh noise (diffusers' SanaSprintPipeline + SCMScheduler). The last angle is 0: the last step
returns x0 and draws no noise that matters.
"""
import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.errors import SanaError

MAX_TIMESTEPS = 1.57080           # diffusers' default first angle (pi/2 rounded up: pure noise)
INTERMEDIATE_TIMESTEPS = 1.3      # its default middle angle for two steps
SIGMA_DATA = 0.5


def scm_timesteps(steps, max_timesteps=MAX_TIMESTEPS, intermediate_timesteps=INTERMEDIATE_TIMESTEPS,
                  timesteps=None):
  """The N + 1 angles from max_timesteps down to 0 (float32): [max, intermediate, 0] for two steps,
  evenly spaced otherwise (intermediate_timesteps only means something for two), or the caller's own
  N + 1 angles, which must fall from at most MAX_TIMESTEPS to 0."""
  if timesteps is not None:
    try:
      angles = np.asarray(timesteps, np.float64).reshape(-1)
    except (TypeError, ValueError):
      raise SanaError("timesteps: expected a list of numbers") from None
    if angles.size != steps + 1:
      raise SanaError(f"timesteps: {angles.size} values for {steps} steps; expected num_inference_steps + 1 = "
                      f"{steps + 1}")
    if not (np.all(np.isfinite(angles)) and np.all(np.diff(angles) < 0) and angles[0] <= MAX_TIMESTEPS
            and angles[-1] == 0):
      raise SanaError(f"timesteps: expected TrigFlow angles falling strictly from at most {MAX_TIMESTEPS} (pi/2) "
                      "to exactly 0")
    return angles.astype(np.float32)
  if not (_is_real(max_timesteps) and 0 < max_timesteps <= MAX_TIMESTEPS):
    raise SanaError(f"max_timesteps {max_timesteps!r}: expected an angle in (0, {MAX_TIMESTEPS}] (pi/2)")
  if steps == 2 and intermediate_timesteps is not None:
    if not (_is_real(intermediate_timesteps) and 0 < intermediate_timesteps < max_timesteps):
      raise SanaError(f"intermediate_timesteps {intermediate_timesteps!r}: expected an angle between 0 and "
                      f"max_timesteps ({max_timesteps})")
    return np.asarray([max_timesteps, intermediate_timesteps, 0.0], np.float32)
  # torch.linspace in float32, as diffusers builds it
  return np.linspace(np.float32(max_timesteps), np.float32(0), steps + 1, dtype=np.float32)


def _is_real(value):
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and np.isfinite(value)


def flow_time(angle):
  """TrigFlow angle -> flow-matching time in [0, 1]."""
  return jnp.sin(angle) / (jnp.cos(angle) + jnp.sin(angle))


def scm_step(model_fn, x, angle, next_angle, noise, sigma_data):
  """One consistency step: (the next sample, the predicted x0), both in TrigFlow scale."""
  t = flow_time(angle)
  norm = jnp.sqrt(t**2 + (1 - t) ** 2)
  model_input = x / sigma_data * norm
  v = model_fn(model_input, t).astype(jnp.float32)
  derivative = ((1 - 2 * t) * model_input + (1 - 2 * t + 2 * t**2) * v) / norm * sigma_data
  x0 = jnp.cos(angle) * x - jnp.sin(angle) * derivative
  return jnp.cos(next_angle) * x0 + jnp.sin(next_angle) * noise * sigma_data, x0


def scm_denoise(model_fn, latents, angles, step_noise, sigma_data=SIGMA_DATA, start=0):
  """The steps from `start` (a Python int; image-to-image starts later) in one scan. latents: the
  sample at angles[start] in TrigFlow scale; step_noise: standard normal [N - 1, ...], row i re-noising
  to angles[i + 1]; model_fn(x, t) -> flow velocity. Returns x0 in the model's latent scale."""
  steps = angles.shape[0] - 1
  # the last step lands on angle 0, where the noise has weight sin(0) = 0
  noise = jnp.concatenate([step_noise.astype(jnp.float32), jnp.zeros((1, *latents.shape), jnp.float32)])

  def body(carry, i):
    return scm_step(model_fn, carry[0], angles[i], angles[i + 1], noise[i], sigma_data), None

  x = latents.astype(jnp.float32)
  (_, x0), _ = jax.lax.scan(body, (x, x), jnp.arange(start, steps))
  return x0 / sigma_data
