"""Optimizers: CAME against a NumPy transcription of the paper, AdamW's decay mask, schedules,
clipping, EMA, and config errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sana_jax
from sana_jax.errors import SanaError
from sana_jax.training.came import came
from sana_jax.training.optimizers import build_optimizer, decay_mask, ema_init, ema_update, path_names, sana_factoring

# ---------------------------------------------------------------------------------------------
# CAME vs NumPy

B1, B2, B3, EPS1, EPS2 = 0.9, 0.999, 0.9999, 1e-30, 1e-16


def came_numpy(p, grads, lrs, weight_decay, clip=1.0):
  """Algorithm 1 of the CAME paper on one tensor, with the reference code's eps placement,
  per-tensor RMS clipping and decoupled weight decay. A 2-D tensor is factored (the paper's sums
  over rows and columns); any other has a full second moment and steps by the momentum alone.
  Returns each step's change to the tensor."""
  factored = p.ndim == 2
  m = np.zeros_like(p)
  if factored:
    r, c = np.zeros(p.shape[0]), np.zeros(p.shape[1])
    big_r, big_c = np.zeros(p.shape[0]), np.zeros(p.shape[1])
  else:
    v = np.zeros_like(p)
  out = []
  for g, lr in zip(grads, lrs):
    sq = g * g + EPS1
    if factored:
      r = B2 * r + (1 - B2) * sq.sum(axis=1)
      c = B2 * c + (1 - B2) * sq.sum(axis=0)
      v = np.outer(r, c) / r.sum()
    else:
      v = B2 * v + (1 - B2) * sq
    u = g / np.sqrt(v)
    u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip)
    m = B1 * m + (1 - B1) * u
    step = m
    if factored:
      instability = (u - m) ** 2 + EPS2
      big_r = B3 * big_r + (1 - B3) * instability.sum(axis=1)
      big_c = B3 * big_c + (1 - B3) * instability.sum(axis=0)
      step = m / np.sqrt(np.outer(big_r, big_c) / big_r.sum())
    delta = -lr * weight_decay * p - lr * step
    p = p + delta
    out.append(delta)
  return out


# path: (shape, stacked, how the reference sees one layer, decays). The reference view is the
# torch parameter's matrix (2-D) or a flat tensor (unfactored).
LEAVES = {
    "proj/kernel": ((6, 10), False, (6, 10), True),
    "conv1x1/kernel": ((1, 1, 6, 10), False, (6, 10), True),
    "blocks/attn/kernel": ((3, 8, 5), True, (8, 5), True),
    "blocks/norm/weight": ((3, 8), True, (8,), False),
    "time_embed/linear/kernel": ((4, 3, 5), False, (4, 15), True),
    "time_embed/linear/bias": ((3, 5), False, (15,), False),
    "conv3x3/kernel": ((3, 3, 2, 4), False, (72,), True),
    "head/bias": ((10,), False, (10,), False),
    "gate": ((), False, (1,), False),
}
STEPS = 6


def nest(flat):
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def flatten(tree):
  return {"/".join(path_names(p)): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def gradient_sequence(rng, shape, stacked):
  """Row and column scales spread over decades (so the factoring matters); the first layer of a
  stack fades fast, so per-layer clipping differs from clipping the whole stack."""
  scales = np.exp(2.0 * rng.standard_normal(shape))
  grads = []
  for t in range(STEPS):
    g = rng.standard_normal(shape) * scales
    if stacked:
      g[0] *= 0.01 ** t
    grads.append(g)
  return grads


def run_numpy(params, grads, lrs, weight_decay):
  result = {}
  for path, (shape, stacked, view, decays) in LEAVES.items():
    copies = shape[0] if stacked else 1
    wd = weight_decay if decays else 0.0
    layers = [came_numpy(params[path].reshape(copies, *view)[i], [g.reshape(copies, *view)[i] for g in grads[path]],
                         lrs, wd) for i in range(copies)]
    result[path] = [np.stack([layer[t] for layer in layers]).reshape(shape) for t in range(STEPS)]
  return result


def run_came(params, grads, lr, weight_decay, dtype):
  mask = nest({path: leaf[3] for path, leaf in LEAVES.items()})
  tx = came(lr, weight_decay=weight_decay, mask=mask, factoring=sana_factoring)
  tree = nest({k: jnp.asarray(v, dtype) for k, v in params.items()})
  state = jax.jit(tx.init)(tree)
  update = jax.jit(tx.update)
  history = []
  for t in range(STEPS):
    updates, state = update(nest({k: jnp.asarray(g[t], dtype) for k, g in grads.items()}), state, tree)
    tree = optax.apply_updates(tree, updates)
    history.append(flatten(updates))
  return history


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-10), ("float32", 2e-5)])
def test_came_matches_numpy_algorithm(dtype, rtol):
  rng = np.random.default_rng(0)
  params = {k: rng.standard_normal(shape) for k, (shape, *_) in LEAVES.items()}
  grads = {k: gradient_sequence(rng, shape, stacked) for k, (shape, stacked, *_) in LEAVES.items()}
  lr = lambda step: 0.05 / (1.0 + step)  # a schedule, as the trainer passes one
  expected = run_numpy(params, grads, [lr(t) for t in range(STEPS)], weight_decay=0.1)
  with jax.enable_x64(dtype == "float64"):
    got = run_came(params, grads, lr, 0.1, dtype)
  for path in LEAVES:
    for t in range(STEPS):
      want = expected[path][t]
      err = np.max(np.abs(got[t][path] - want)) / np.max(np.abs(want))
      assert err <= rtol, f"{path} step {t}: relative error {err:.2e}"


def tiny_dit_params():
  cfg = sana_jax.SanaTransformerConfig(in_channels=4, out_channels=4, num_attention_heads=2, num_layers=2,
                                       num_cross_attention_heads=2, cross_attention_head_dim=32,
                                       cross_attention_dim=64, caption_channels=32, qk_norm="rms_norm_across_heads")
  return nnx.state(nnx.eval_shape(lambda: sana_jax.SanaTransformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def test_dit_factoring_follows_the_reference():
  """Per layer: matrices and the (6, D) modulation table factored, as in Sana's CAMEWrapper;
  norms, biases and the 3x3 depthwise kernel with a full second moment."""
  got = {"/".join(path_names(p)): sana_factoring(p, x.shape)
         for p, x in jax.tree_util.tree_leaves_with_path(tiny_dit_params())}
  def rows_cols(name):
    return got[name].stacked, got[name].rows, got[name].cols
  assert rows_cols("blocks/scale_shift_table") == (1, (1,), (2,))
  assert rows_cols("blocks/attn1/to_q/kernel") == (1, (1,), (2,))
  assert rows_cols("blocks/ff/conv_inverted/kernel") == (1, (1,), (2, 3))  # [L, D, 2, hidden]: D x 2*hidden
  assert rows_cols("time_embed/linear/kernel") == (0, (0,), (1, 2))
  assert rows_cols("scale_shift_table") == (0, (0,), (1,))
  for name in ["blocks/attn1/norm_q/weight", "blocks/ff/conv_depth_kernel", "blocks/ff/conv_depth_bias",
               "blocks/attn2/to_q/bias", "time_embed/linear/bias", "caption_norm/weight"]:
    assert not got[name].factored, name
  assert got["blocks/ff/conv_depth_kernel"].stacked == 1


def test_came_state_is_factored_and_jits_on_sharded_params():
  mesh = jax.make_mesh((8,), ("x",))
  rng = np.random.default_rng(1)
  params = {"blocks": {"kernel": rng.standard_normal((8, 16, 24)), "norm": rng.standard_normal((8, 16))},
            "proj": {"kernel": rng.standard_normal((16, 24))}}
  grads = jax.tree.map(lambda p: np.asarray(rng.standard_normal(p.shape), np.float32), params)
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  tx = came(1e-2, weight_decay=0.1, factoring=sana_factoring)
  state = tx.init(params)
  came_state = state[0]
  assert came_state.v_row["blocks"]["kernel"].shape == (8, 16, 1)
  assert came_state.v_col["blocks"]["kernel"].shape == (8, 1, 24)
  assert came_state.v["blocks"]["norm"].shape == (8, 16)
  want, _ = jax.jit(tx.update)(grads, state, params)

  shard = lambda tree: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("x"))), tree)
  sharded_params = shard(params)
  sharded_state = jax.jit(tx.init)(sharded_params)
  got, _ = jax.jit(tx.update)(shard(grads), sharded_state, sharded_params)
  assert got["blocks"]["kernel"].sharding.spec[0] == "x"
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_came_clips_update_rms(threshold):
  """First step: u = g / sqrt((1 - b2) g^2) has RMS ~31.6, clipped to the threshold; the step is
  (1 - b1) times it."""
  g = {"v": jnp.linspace(-1.0, 2.0, 7), "m": jnp.arange(12.0).reshape(3, 4) - 5.0}
  tx = came(1.0, clip_threshold=threshold)
  updates, _ = jax.jit(tx.update)(g, tx.init(g))
  rms = float(jnp.sqrt(jnp.mean(jnp.square(updates["v"]))))
  np.testing.assert_allclose(rms, (1 - B1) * threshold, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# AdamW, the decay mask, clipping


def masked_tree():
  rng = np.random.default_rng(2)
  shapes = {"blocks/attn/kernel": (2, 4, 6), "blocks/norm/weight": (2, 4), "blocks/scale_shift_table": (2, 6, 4),
            "blocks/attn/bias": (2, 6), "proj/kernel": (4, 3), "proj/bias": (3,), "pos_embedding": (5, 4)}
  return nest({k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()})


def test_decay_mask_names_and_ranks():
  mask = flatten(decay_mask(masked_tree()))
  assert {k for k, v in mask.items() if v} == {"blocks/attn/kernel", "proj/kernel"}
  dit = flatten(decay_mask(tiny_dit_params()))  # nnx.State paths end in `.value`: same rule
  assert dit["blocks/attn1/to_q/kernel"] and dit["blocks/ff/conv_depth_kernel"] and dit["patch_embed/kernel"]
  assert not dit["blocks/attn1/norm_q/weight"] and not dit["blocks/scale_shift_table"]
  assert not dit["time_embed/linear/bias"] and not dit["caption_norm/weight"]


def test_adamw_decays_only_masked_leaves():
  params = masked_tree()
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
  tx, _ = build_optimizer(dict(name="adamw", lr=1e-2, weight_decay=0.5), global_batch=8, total_steps=10)
  expected_mask = nest({k: k in ("blocks/attn/kernel", "proj/kernel") for k in flatten(params)})
  reference = optax.adamw(1e-2, weight_decay=0.5, mask=expected_mask)
  no_decay = optax.adam(1e-2)
  got = flatten(jax.jit(tx.update)(grads, tx.init(params), params)[0])
  want = flatten(jax.jit(reference.update)(grads, reference.init(params), params)[0])
  plain = flatten(jax.jit(no_decay.update)(grads, no_decay.init(params))[0])
  for k in got:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-8)
    assert np.allclose(got[k], plain[k], rtol=1e-6, atol=1e-8) == (not flatten(expected_mask)[k]), k


@pytest.mark.parametrize("clip_norm", [None, 0.5, 100.0])
def test_global_norm_clipping(clip_norm):
  """AdamW's first step is g / (|g| + eps): with eps = 1 it shows the gradient's scale."""
  g = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([[12.0]])}  # global norm 13
  tx, _ = build_optimizer(dict(name="adamw", lr=1.0, eps=1.0, clip_norm=clip_norm), global_batch=1, total_steps=1)
  updates, _ = jax.jit(tx.update)(g, tx.init(g), g)
  factor = min(1.0, clip_norm / 13.0) if clip_norm else 1.0
  for k in g:
    clipped = np.asarray(g[k]) * factor
    np.testing.assert_allclose(updates[k], -clipped / (np.abs(clipped) + 1.0), rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# Schedules


def schedule_of(**optim):
  kw = dict(global_batch=optim.pop("global_batch", 256), total_steps=optim.pop("total_steps", 1000))
  return build_optimizer(dict(name="came", lr=1e-3, **optim), **kw)[1]


def test_warmup_then_constant():
  s = schedule_of(warmup_steps=100)
  np.testing.assert_allclose([s(0), s(50), s(100), s(999), s(5000)], [0.0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(schedule_of()(0), 1e-3, rtol=1e-6)


def test_cosine_endpoints():
  s = schedule_of(warmup_steps=100, schedule="cosine", end_lr_factor=0.1, total_steps=1100)
  np.testing.assert_allclose([s(0), s(100), s(600), s(1100), s(2000)], [0.0, 1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-5)
  assert s(300) > s(400) > s(500)


@pytest.mark.parametrize("rule, factor", [(None, 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling(rule, factor):
  s = schedule_of(lr_scaling=rule, base_batch=64, global_batch=256)
  np.testing.assert_allclose(s(10), 1e-3 * factor, rtol=1e-6)


def test_came_from_config_runs_jitted_with_schedule():
  """build_optimizer's CAME on an nnx.State: the schedule sets each step's size (0 at step 0)."""
  params = nnx.State(jax.tree.map(nnx.Param, masked_tree()))
  tx, _ = build_optimizer(dict(name="came", lr=1e-3, warmup_steps=2, weight_decay=0.03, clip_norm=1.0),
                          global_batch=8, total_steps=10)
  state, step = jax.jit(tx.init)(params), jax.jit(tx.update)
  grads = jax.tree.map(lambda p: jnp.sin(p) + 0.3, params)
  first, state = step(grads, state, params)
  second, _ = step(grads, state, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(first))
  assert all(float(jnp.min(jnp.abs(u))) > 0.0 for u in jax.tree.leaves(second))


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_update_is_float32_and_exact():
  params = {"w": jnp.array([1.0, 2.0], jnp.bfloat16), "b": jnp.array(3.0)}
  ema = ema_init({"w": jnp.zeros(2, jnp.bfloat16), "b": jnp.array(1.0)})
  new = jax.jit(ema_update)(ema, params, 0.9)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
  np.testing.assert_allclose(new["w"], [0.1, 0.2], rtol=1e-6)
  np.testing.assert_allclose(new["b"], 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6)
  np.testing.assert_allclose(ema_update(ema, params, 0.0)["w"], [1.0, 2.0])
  np.testing.assert_allclose(ema_update(ema, params, 1.0)["b"], 1.0)


# ---------------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize("optim, total_steps", [
    (dict(name="lamb"), 10),
    (dict(name="came", learning_rate=1e-4), 10),
    (dict(name="came", lr_scaling="cubic"), 10),
    (dict(name="came", schedule="linear"), 10),
    (dict(name="came", eps=1e-8), 10),
    (dict(name="adamw", eps=(1e-30, 1e-16)), 10),
    (dict(name="adamw", b3=0.99), 10),
    (dict(name="adamw", clip_threshold=2.0), 10),
    (dict(name="came", lr=-1.0), 10),
    (dict(name="came", schedule="cosine", warmup_steps=10), 10),
])
def test_bad_config_is_one_line_sana_error(optim, total_steps):
  with pytest.raises(SanaError) as err:
    build_optimizer(optim, global_batch=8, total_steps=total_steps)
  assert "\n" not in str(err.value) and str(err.value).startswith("optim")


def test_config_dict_accepted():
  """A ConfigDict, with CAME's keys left at their defaults (as a shared config carries them) under AdamW."""
  ml_collections = pytest.importorskip("ml_collections")
  c = ml_collections.ConfigDict(dict(name="adamw", lr=2e-4, lr_scaling="sqrt", base_batch=64, warmup_steps=0,
                                     b3=0.9999, clip_threshold=1.0, eps=None))
  _, schedule = build_optimizer(c, global_batch=256, total_steps=10)
  np.testing.assert_allclose(schedule(3), 2e-4 * math.sqrt(256 / 64), rtol=1e-6)
