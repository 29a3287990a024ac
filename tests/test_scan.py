"""Blocks run under one scan: compile time is flat in depth; remat changes memory, not results."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sana_jax
from sana_jax.models.dit import pure_forward

SMALL = dict(in_channels=4, out_channels=4, num_attention_heads=2, num_cross_attention_heads=2,
             cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=32)


def build(num_layers, **kw):
  """A model with every parameter moved off its init (zero-init output layers would zero all grads)."""
  cfg = sana_jax.SanaTransformerConfig(**SMALL, num_layers=num_layers, **kw)
  model = sana_jax.SanaTransformer(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  moved = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, moved))
  return model


def inputs():
  return (jnp.ones((2, 8, 6, 4)), jnp.array([0.3, 0.7]), jnp.ones((2, 5, 32)), jnp.ones((2, 5)))


def compile_seconds(model):
  apply, state = pure_forward(model)
  start = time.perf_counter()
  jax.jit(apply).lower(state, *inputs()).compile()
  return time.perf_counter() - start


def test_compile_time_flat_in_depth():
  compile_seconds(build(2))  # warm up the compiler itself
  shallow = min(compile_seconds(build(2)) for _ in range(2))
  deep = min(compile_seconds(build(28)) for _ in range(2))
  assert deep < 2.5 * shallow + 0.5, f"28 layers took {deep:.2f}s to compile, 2 layers {shallow:.2f}s"


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_values_and_gradients(policy):
  plain, remat = build(3), build(3, remat=policy)

  def loss(model):
    return jnp.mean(jnp.square(model(*inputs())))

  l0, g0 = nnx.value_and_grad(loss)(plain)
  l1, g1 = nnx.value_and_grad(loss)(remat)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g0.blocks))
