"""Sana's flow-matching objective: x_t = (1 - s) x0 + s n, target n - x0, mean squared error.

How the reference trains it (NVlabs/Sana `iddpm.Scheduler` with `linear_flow` betas): u is drawn
logit-normal (or uniform), an integer index t = floor(1000 u) gives the base sigma t / 1000, the flow
shift maps it to s = shift * sigma / (1 + (shift - 1) * sigma), and the model sees the timestep
floor(1000 s). `integer_timesteps=False` (the default) keeps u, s and the timestep continuous, as
diffusers' training scripts do; the sampler feeds the model 1000 s either way.
"""
import jax
import jax.numpy as jnp

from sana_jax.sampling.schedules import shifted

NUM_TRAIN_TIMESTEPS = 1000


def sample_sigmas(rng, batch, *, weighting="logit_normal", logit_mean=0.0, logit_std=1.0, flow_shift=1.0,
                  integer_timesteps=False):
  """(sigmas [B] in [0, 1), model timesteps [B] in [0, 1000)), float32."""
  if weighting == "logit_normal":
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,)))
  elif weighting == "uniform":
    u = jax.random.uniform(rng, (batch,))
  else:
    raise ValueError(f"unknown timestep weighting {weighting!r}; expected 'logit_normal' or 'uniform'")
  if integer_timesteps:
    index = jnp.floor(u * NUM_TRAIN_TIMESTEPS)
    sigma = shifted(index / NUM_TRAIN_TIMESTEPS, flow_shift)
    return sigma, jnp.floor(sigma * NUM_TRAIN_TIMESTEPS)
  sigma = shifted(jnp.minimum(u, 1.0 - 1e-6), flow_shift)
  return sigma, sigma * NUM_TRAIN_TIMESTEPS


def drop_captions(rng, y, mask, null_y, null_mask, prob):
  """Each caption replaced by the empty prompt's embedding with probability `prob` (for CFG)."""
  if prob <= 0:
    return y, mask
  drop = jax.random.bernoulli(rng, prob, (y.shape[0],))
  y = jnp.where(drop[:, None, None], null_y[None].astype(y.dtype), y)
  mask = jnp.where(drop[:, None], null_mask[None].astype(mask.dtype), mask)
  return y, mask


def noised(x0, noise, sigma):
  s = sigma[:, None, None, None]
  return (1 - s) * x0 + s * noise, noise - x0


def flow_loss(predict, x0, noise, sigma, timesteps):
  """Mean squared error of predict(x_t, timesteps) against the velocity target, in float32."""
  x_t, target = noised(x0, noise, sigma)
  pred = predict(x_t, timesteps).astype(jnp.float32)
  return jnp.mean(jnp.square(pred - target))
