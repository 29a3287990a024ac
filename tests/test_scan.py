"""Blocks run under one scan: compile time is flat in depth; remat changes memory, not results."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sana_jax
from sana_jax.models import initialized
from sana_jax.models.dit import pure_forward

SMALL = dict(in_channels=4, out_channels=4, num_attention_heads=2, num_cross_attention_heads=2,
             cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=32)


def build(num_layers, **kw):
  """A model with every parameter moved off its init (zero-init output layers would zero all grads)."""
  cfg = sana_jax.SanaTransformerConfig(**SMALL, num_layers=num_layers, **kw)
  model = initialized(lambda: sana_jax.SanaTransformer(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)

  @jax.jit
  def moved(state):  # one random draw split over the leaves: XLA's CPU compile time grows with each draw
    leaves, treedef = jax.tree.flatten(state)
    noise = jax.random.normal(jax.random.key(1), (sum(p.size for p in leaves),))
    ends = np.cumsum([p.size for p in leaves])[:-1]
    return jax.tree.unflatten(treedef, [p + 0.05 * n.reshape(p.shape) for p, n in zip(leaves, jnp.split(noise, ends))])

  nnx.update(model, moved(state))
  return model


def inputs():
  return (jnp.ones((2, 8, 6, 4)), jnp.array([0.3, 0.7]), jnp.ones((2, 5, 32)), jnp.ones((2, 5)))


def compile_seconds(model):
  apply, state = pure_forward(model)
  start = time.perf_counter()
  jax.jit(apply).lower(state, *inputs()).compile()
  return time.perf_counter() - start


def test_compile_time_flat_in_depth():
  # the persistent compilation cache (conftest) would turn the repeated compiles into cache loads
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    shallow_model, deep_model = build(2), build(28)
    compile_seconds(shallow_model)  # warm up the compiler itself
    shallow = min(compile_seconds(shallow_model) for _ in range(2))
    deep = min(compile_seconds(deep_model) for _ in range(2))
  finally:
    jax.config.update("jax_enable_compilation_cache", cached)
  assert deep < 2.5 * shallow + 0.5, f"28 layers took {deep:.2f}s to compile, 2 layers {shallow:.2f}s"


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_values_and_gradients(policy):
  plain, remat = build(3), build(3, remat=policy)

  @nnx.jit
  def value_and_grad(model):
    return nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(*inputs()))))(model)

  l0, g0 = value_and_grad(plain)
  l1, g1 = value_and_grad(remat)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g0.blocks))
