"""Sana's ReLU linear attention (non-causal).

out_i = sum_j v_j (k_j . q_i) / (sum_j k_j . q_i + eps), with q and k already ReLU'd by the caller.
Sums are accumulated in float32 whatever the input dtype, as the reference implementations do.

`linear_attention(..., implementation=)` picks the XLA reference below or the Pallas kernels
(linear_attention_pallas.py); "auto" measures both once per device, shape and dtype.
"""
import concurrent.futures
import logging
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "pallas")
ENV_VAR = "SANA_JAX_LINEAR_ATTENTION"  # "xla" | "pallas": what "auto" resolves to, without measuring
FASTER = 0.95  # "auto" takes the kernel only where it needs at most this share of XLA's time
QUEUED = 5  # calls per timed sample: timing single blocking calls of ~50 us measures the host
_DECISIONS = {}  # (platform, device kind, per-device shape, dtype name) -> "xla" | "pallas"
_log = logging.getLogger(__name__)


def linear_attention_reference(q, k, v, eps=1e-15):
  """q, k, v: [B, N, H, D] -> [B, N, H, D] in float32.

  bf16 operands are multiplied with float32 accumulation; that equals casting them to float32
  first (products of two bf16 numbers are exact in float32) without materialising the casts.
  Heads are moved in front of tokens first: batched matmuls over [B, H] run 2.7x faster on
  XLA:CPU than the same einsums on the token-major layout.
  """
  hi = jax.lax.Precision.HIGHEST  # keep float32 sums out of TF32/bf16 passes on GPUs and TPUs
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, H, N, D]
  if jax.default_backend() == "cpu" or k.dtype == jnp.float32:  # XLA:CPU has no bf16 x bf16 -> f32 dot
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    kv = jnp.einsum("bhnd,bhne->bhde", k, v, precision=hi)
  else:  # low-precision operands, float32 accumulation: exact, and on the tensor cores
    kv = jnp.einsum("bhnd,bhne->bhde", k, v, preferred_element_type=jnp.float32)
  k_sum = jnp.sum(k.astype(jnp.float32), axis=2)  # [B, H, D]
  q32 = q.astype(jnp.float32)
  num = jnp.einsum("bhnd,bhde->bhne", q32, kv, precision=hi)
  den = jnp.einsum("bhnd,bhd->bhn", q32, k_sum, precision=hi)[..., None]
  return jnp.swapaxes(num / (den + eps), 1, 2)


def linear_attention(q, k, v, *, eps=1e-15, implementation="auto"):
  """Dispatches to a backend. "pallas" forces the Pallas kernels (interpret mode on CPU); "auto"
  is XLA on CPU and elsewhere whichever `choose_implementation` measured faster."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown linear-attention implementation {implementation!r}; "
                     f"expected one of {IMPLEMENTATIONS}")
  if implementation == "auto":
    implementation = choose_implementation(_local_shape(q.shape), q.dtype, eps)
  if implementation == "pallas":
    return _pallas_sharded(q, k, v, eps)
  return linear_attention_reference(q, k, v, eps=eps)


# ---- "auto": measure once per (device, shape, dtype), remember, never pick the slower ----

def choose_implementation(shape, dtype, eps=1e-15):
  """"xla" or "pallas" for q/k/v of per-device `shape` [B, N, H, D] and `dtype` on the default
  device. $SANA_JAX_LINEAR_ATTENTION forces a choice; CPU is always XLA (Pallas only interprets
  there). Otherwise the first call for a key times both implementations, forward and
  forward+backward, on concrete arrays (allowed inside a jit trace: the timed functions are
  separate computations) and the kernel wins only if faster at both by the FASTER margin.
  A kernel that fails to lower or run loses, and that is remembered too."""
  forced = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
  if forced not in IMPLEMENTATIONS:
    raise ValueError(f"${ENV_VAR}={forced!r}; expected one of {IMPLEMENTATIONS}")
  if forced != "auto":
    return forced
  platform, kind = _device()
  if platform == "cpu":
    return "xla"
  key = (platform, kind, tuple(shape), jnp.dtype(dtype).name)
  if key not in _DECISIONS:
    _DECISIONS[key] = decide(_measure(shape, dtype, eps))
    _log.info("linear attention %s: %s", key, _DECISIONS[key])
  return _DECISIONS[key]


def decide(times):
  """times: {"xla": (fwd_s, fwd_bwd_s), "pallas": (...)}, "pallas" absent when it failed."""
  pallas = times.get("pallas")
  if pallas is None:
    return "xla"
  faster = all(p <= FASTER * x for p, x in zip(pallas, times["xla"]))
  return "pallas" if faster else "xla"


def _device():
  return jax.default_backend(), jax.devices()[0].device_kind


def _measure(shape, dtype, eps, repeats=10):
  """Median seconds {impl: (fwd, fwd_bwd)} on concrete random inputs of `shape` and `dtype`.
  Runs in a fresh thread: JAX's trace state is per thread, so nothing there is staged into a jit
  trace that may be calling us, and the timed functions execute for real."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(_measure_now, shape, dtype, eps, repeats).result()


def _measure_now(shape, dtype, eps, repeats):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(np.abs(rng.standard_normal(shape)), dtype) for _ in range(3))
  fns = {impl: _candidates(impl, eps, q, k, v) for impl in ("xla", "pallas")}
  try:
    for fn in fns["pallas"]:  # compiles: a lowering the backend rejects surfaces here
      fn()
  except Exception as e:  # noqa: BLE001 - any failure means "not this kernel here"
    _log.warning("Pallas linear attention unavailable for %s %s, using XLA: %s", shape, dtype, e)
    del fns["pallas"]
  medians = _time_alternating([fn for pair in fns.values() for fn in pair], repeats)
  return {impl: tuple(medians[2 * i:2 * i + 2]) for i, impl in enumerate(fns)}


def _candidates(impl, eps, q, k, v):
  """(forward, forward+backward) thunks that block until done."""
  if impl == "pallas":
    from sana_jax.kernels.linear_attention_pallas import linear_attention_pallas
    attend = lambda q, k, v: linear_attention_pallas(q, k, v, eps)  # compiled, never interpreted
  else:
    attend = lambda q, k, v: linear_attention_reference(q, k, v, eps)
  return timed_calls(attend, q, k, v, QUEUED)


def timed_calls(attend, q, k, v, queued):
  """(forward, forward+backward) thunks that each run `queued` calls, then block: several calls in
  flight overlap host dispatch with device work, as inside a model."""
  fwd = jax.jit(attend)
  # value_and_grad, as training uses it: with grad alone the forward output is dead code
  fwd_bwd = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v)), (0, 1, 2)))

  def thunk(f):
    def run():
      for _ in range(queued):
        out = f(q, k, v)
      jax.block_until_ready(out)
    return run
  return thunk(fwd), thunk(fwd_bwd)


def _time_alternating(fns, repeats):
  """Median seconds per thunk, run in turn so drift hits all alike (first run: compile, warm-up)."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times):
      start = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - start)
  return [statistics.median(ts) for ts in times]


# ---- shard_map: pallas_call is not partitioned automatically ----

def _spec(shape):
  """(mesh, PartitionSpec of q/k/v) under an active mesh: batch, tokens (sequence parallelism, the DC-AE's
  row split) and heads split as the rules say."""
  from sana_jax import parallel
  active = parallel.active_mesh()
  if active is None:
    return None, None
  mesh, rules = active
  for tokens in (*parallel.ROW_AXES, None):  # tokens split (sequence parallelism, DC-AE rows), or not
    spec = parallel.logical_to_spec(("batch", tokens, "heads", None), shape, mesh, rules)
    if tokens is None or spec[1] is not None:
      return mesh, spec


def _local_shape(shape):
  """The per-device shape the kernel would see under the active mesh (the global one without)."""
  mesh, spec = _spec(shape)
  if mesh is None:
    return tuple(shape)
  axes = lambda s: () if s is None else (s,) if isinstance(s, str) else tuple(s)
  return tuple(n // int(np.prod([mesh.shape[a] for a in axes(s)])) for n, s in zip(shape, spec))


def _pallas_sharded(q, k, v, eps):
  """Runs the kernel per shard with shard_map under a mesh, directly otherwise."""
  from sana_jax.kernels.linear_attention_pallas import linear_attention_pallas
  kernel = lambda q, k, v: linear_attention_pallas(q, k, v, eps, interpret=jax.default_backend() == "cpu")
  mesh, spec = _spec(q.shape)
  if mesh is None:
    return kernel(q, k, v)
  from sana_jax import parallel
  if spec[1] is not None:  # tokens split: each device sums its own, one psum, then each applies (forward only)
    combine = lambda kv, ksum: (jax.lax.psum(kv, spec[1]), jax.lax.psum(ksum, spec[1]))
    kernel = lambda q, k, v: linear_attention_pallas(q, k, v, eps, interpret=jax.default_backend() == "cpu",
                                                     combine=combine)
  return parallel.shard_map(kernel, mesh, (spec, spec, spec), spec)(q, k, v)
