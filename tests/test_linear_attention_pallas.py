"""The Pallas linear-attention kernels (interpret mode on CPU) against the XLA reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sana_jax
from reference import rel_err
from sana_jax.kernels import linear_attention_reference
from sana_jax.kernels.linear_attention_pallas import linear_attention_pallas


def qkv(shape, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q, k = (jax.nn.relu(jax.random.normal(kk, shape)) for kk in keys[:2])
  return q.astype(dtype), k.astype(dtype), jax.random.normal(keys[2], shape).astype(dtype)


@pytest.mark.parametrize("n,heads,block", [(37, 1, 16), (130, 3, 64), (200, 6, 64), (77, 8, 32)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_forward_and_gradients_match_reference(n, heads, block, dtype, tol):
  q, k, v = qkv((2, n, heads, 32), dtype)  # n is never a multiple of the block: padded tails
  pallas = lambda q, k, v: linear_attention_pallas(q, k, v, 1e-15, block, True)
  got, want = pallas(q, k, v), linear_attention_reference(q, k, v)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  assert rel_err(got, want) <= tol
  w = jax.random.normal(jax.random.key(9), want.shape)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
  for g_got, g_want in zip(jax.grad(loss(pallas), (0, 1, 2))(q, k, v),
                           jax.grad(loss(linear_attention_reference), (0, 1, 2))(q, k, v)):
    assert rel_err(np.asarray(g_got, np.float32), np.asarray(g_want, np.float32)) <= (1e-4 if dtype == jnp.float32 else 3e-2)


def test_dit_with_pallas_equals_xla_including_grad():
  cfg = sana_jax.SanaTransformerConfig(in_channels=4, out_channels=4, num_attention_heads=4, num_layers=2,
                                       num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=128,
                                       caption_channels=16)
  model = sana_jax.SanaTransformer(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(kk, p.shape) for p, kk in zip(leaves, keys)]))
  x, t = jax.random.normal(jax.random.key(2), (2, 5, 7, 4)), jnp.array([0.3, 0.8])
  y, mask = jax.random.normal(jax.random.key(3), (2, 6, 16)), jnp.array([[1, 1, 1, 0, 0, 0], [1] * 6])

  def loss(m):
    return jnp.mean(jnp.square(m(x, t, y, mask)))

  model.set_attention_impl("xla")
  out_xla, (l_xla, g_xla) = model(x, t, y, mask), nnx.value_and_grad(loss)(model)
  model.set_attention_impl("pallas")
  out_pallas, (l_pal, g_pal) = model(x, t, y, mask), nnx.value_and_grad(loss)(model)
  assert rel_err(out_pallas, out_xla) <= 1e-4
  flat = lambda g: np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])
  assert rel_err(flat(g_pal), flat(g_xla)) <= 1e-4  # all parameter gradients together
  scale = np.abs(flat(g_xla)).max()
  for a, b in zip(jax.tree.leaves(g_pal), jax.tree.leaves(g_xla)):  # and none off on its own
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * scale


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")
def test_kernel_runs_per_shard_under_a_mesh():
  from sana_jax import parallel
  from sana_jax.kernels import linear_attention
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  q, k, v = qkv((4, 45, 6, 32), jnp.float32)
  spec = jax.sharding.NamedSharding(mesh, parallel.logical_to_spec(("batch", None, "heads", None), q.shape, mesh))
  q, k, v = (jax.device_put(a, spec) for a in (q, k, v))
  with parallel.use_mesh(mesh):
    got = jax.jit(lambda q, k, v: linear_attention(q, k, v, implementation="pallas"))(q, k, v)
  assert got.sharding.spec == spec.spec  # batch over (data, fsdp), heads over tensor: no gather
  assert rel_err(got, linear_attention_reference(q, k, v)) <= 1e-5
