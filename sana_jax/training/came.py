"""CAME (Luo et al. 2023, arXiv 2307.02047, Algorithm 1) as an optax transformation.

CAME is Adafactor's factored second moment plus a first moment, scaled by a second factored
statistic: the "instability" (update - momentum)^2, which shrinks steps where the momentum
disagrees with the current update. Numerics follow the reference implementations (yangluo7/CAME,
NVlabs/Sana `CAMEWrapper`): no bias correction; eps1 is added to g^2 before the row/column means;
each tensor's update is divided by max(1, RMS / clip_threshold) before the momentum; parameters
with an unfactored second moment skip the confidence scaling (their step is the momentum);
weight decay is decoupled and scaled by the learning rate (p -= lr * wd * p).

Which axes are factored is a per-parameter choice (`Factoring`), made from the parameter's path
and shape at trace time, so the transformation is a pure, jit-able function of pytrees. Statistics
keep the parameter's rank (reduced axes have size 1): no reshapes, so sharded parameters give
sharded statistics by plain propagation.
"""
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Factoring:
  """How CAME sees one parameter.

  stacked: the number of leading axes that index independent copies (the DiT's scanned "layers"
    axis); each copy is clipped on its own, exactly as separate tensors would be.
  rows, cols: the axes whose second moment is factored as a matrix (rows x cols); the row
    statistic averages over `cols`, the column statistic over `rows`. Other non-stacked axes are
    independent for the factoring but share the clipping. Empty: a full (unfactored) moment.
  """
  stacked: int = 0
  rows: tuple[int, ...] = ()
  cols: tuple[int, ...] = ()

  @property
  def factored(self):
    return bool(self.rows)


FactoringRule = Callable[[tuple, tuple[int, ...]], Factoring]  # (tree path, shape) -> Factoring


def last_two_dims(path, shape) -> Factoring:
  """The CAME paper's rule (yangluo7/CAME): factor any parameter of rank >= 2 over its last two
  axes (leading axes are independent matrices), clip per tensor; vectors are unfactored."""
  del path
  if len(shape) < 2:
    return Factoring()
  return Factoring(rows=(len(shape) - 2,), cols=(len(shape) - 1,))


class CameState(NamedTuple):
  """Per-parameter statistics, each a tree shaped like the parameters. Factored parameters keep
  v_row/v_col and r_row/r_col (the instability) and a placeholder in v; unfactored ones the
  reverse. Float32 (float64 for float64 parameters)."""
  mu: Any
  v_row: Any
  v_col: Any
  v: Any
  r_row: Any
  r_col: Any


def _stat_dtype(dtype):
  """Statistics and arithmetic in at least float32 (bf16 gradients are upcast, as the reference does)."""
  return jnp.promote_types(dtype, jnp.float32)


def _reduced(shape, axes):
  return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _init_leaf(f: Factoring, p):
  """Zeros for (mu, v_row, v_col, v, r_row, r_col); unused slots hold a (1,) placeholder. Every
  slot is its own array, so a donated state never passes one buffer twice."""
  dtype = _stat_dtype(p.dtype)
  zeros = lambda shape: jnp.zeros(shape, dtype)
  if not f.factored:
    return zeros(p.shape), zeros((1,)), zeros((1,)), zeros(p.shape), zeros((1,)), zeros((1,))
  row, col = _reduced(p.shape, f.cols), _reduced(p.shape, f.rows)
  return zeros(p.shape), zeros(row), zeros(col), zeros((1,)), zeros(row), zeros(col)


def _ema(avg, x, beta):
  return beta * avg + (1.0 - beta) * x  # the reference's form, not a lerp: same rounding


def _inv_sqrt_factored(row, col, f: Factoring):
  """1 / sqrt(row col^T / mean(row)): Adafactor's rank-1 estimate of the full moment."""
  return jax.lax.rsqrt(row / jnp.mean(row, axis=f.rows, keepdims=True)) * jax.lax.rsqrt(col)


def _clip_by_rms(u, f: Factoring, threshold):
  """Divide each copy by max(1, RMS(copy) / threshold)."""
  axes = tuple(range(f.stacked, u.ndim))
  rms = jnp.sqrt(jnp.mean(jnp.square(u), axis=axes, keepdims=True))
  return u / jnp.maximum(1.0, rms / threshold)


def _update_leaf(f: Factoring, g, stats, *, b1, b2, b3, eps1, eps2, clip_threshold):
  mu, v_row, v_col, v, r_row, r_col = stats
  grad = g.astype(_stat_dtype(g.dtype))
  sq = jnp.square(grad) + eps1
  if f.factored:
    v_row = _ema(v_row, jnp.mean(sq, axis=f.cols, keepdims=True), b2)
    v_col = _ema(v_col, jnp.mean(sq, axis=f.rows, keepdims=True), b2)
    u = grad * _inv_sqrt_factored(v_row, v_col, f)
  else:
    v = _ema(v, sq, b2)
    u = grad * jax.lax.rsqrt(v)
  u = _clip_by_rms(u, f, clip_threshold)
  mu = _ema(mu, u, b1)
  step = mu
  if f.factored:  # confidence: damp the momentum where it has been far from the updates
    instability = jnp.square(u - mu) + eps2
    r_row = _ema(r_row, jnp.mean(instability, axis=f.cols, keepdims=True), b3)
    r_col = _ema(r_col, jnp.mean(instability, axis=f.rows, keepdims=True), b3)
    step = mu * _inv_sqrt_factored(r_row, r_col, f)
  return step.astype(g.dtype), (mu, v_row, v_col, v, r_row, r_col)


def _flatten_with_factoring(rule, tree):
  """The leaves of `tree`, each leaf's Factoring, and the treedef that rebuilds trees like it."""
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  factorings = [rule(path, tuple(leaf.shape)) for path, leaf in path_leaves]
  return [leaf for _, leaf in path_leaves], factorings, treedef


def _state_from_leaves(treedef, per_leaf):
  """Per-leaf 6-tuples of statistics -> a CameState of six parameter-shaped trees."""
  columns = list(zip(*per_leaf)) or [()] * len(CameState._fields)
  return CameState(*(treedef.unflatten(list(column)) for column in columns))


def scale_by_came(b1=0.9, b2=0.999, b3=0.9999, eps=(1e-30, 1e-16), clip_threshold=1.0,
                  factoring: FactoringRule = last_two_dims) -> optax.GradientTransformation:
  """CAME's preconditioned, clipped, confidence-scaled step (before the learning rate)."""
  eps1, eps2 = eps
  hyper = dict(b1=b1, b2=b2, b3=b3, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold)

  def init(params):
    leaves, factorings, treedef = _flatten_with_factoring(factoring, params)
    return _state_from_leaves(treedef, [_init_leaf(f, p) for f, p in zip(factorings, leaves)])

  def update(updates, state, params=None):
    del params
    grads, factorings, treedef = _flatten_with_factoring(factoring, updates)
    stats = zip(*(treedef.flatten_up_to(tree) for tree in state))
    results = [_update_leaf(f, g, s, **hyper) for f, g, s in zip(factorings, grads, stats)]
    steps = treedef.unflatten([step for step, _ in results])
    return steps, _state_from_leaves(treedef, [leaf_stats for _, leaf_stats in results])

  return optax.GradientTransformation(init, update)


def came(learning_rate, b1=0.9, b2=0.999, b3=0.9999, eps=(1e-30, 1e-16), clip_threshold=1.0,
         weight_decay=0.0, mask=None, factoring: FactoringRule = last_two_dims) -> optax.GradientTransformation:
  """CAME with decoupled weight decay: p -= lr * (step + weight_decay * p).

  learning_rate: a float or an optax schedule. mask: a tree of bools or a function of the params
  saying which leaves decay (optax's convention). factoring: (path, shape) -> Factoring.
  """
  parts = [scale_by_came(b1, b2, b3, eps, clip_threshold, factoring)]
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
