"""The Pallas linear-attention kernels (interpret mode on CPU) against the XLA reference, their
lowerings for TPU (Mosaic) and GPU (Triton), and how implementation="auto" decides."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu
from reference import rel_err

import sana_jax
from sana_jax.kernels import linear_attention, linear_attention_reference
from sana_jax.kernels.linear_attention_gpu import linear_attention_gpu, make_gpu_plan
from sana_jax.kernels.linear_attention_pallas import linear_attention_pallas

# the module: the package re-exports its function under the same name
dispatch = importlib.import_module("sana_jax.kernels.linear_attention")


def qkv(shape, dtype, seed=0):
  """ReLU'd q, k and a signed v. (numpy draws: no XLA compile per shape, which adds up on CPU.)"""
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal(shape, np.float32) for _ in range(3))
  return tuple(jnp.asarray(a, dtype) for a in (np.maximum(q, 0), np.maximum(k, 0), v))


def value_and_vjp(f, q, k, v):
  """f(q, k, v) and its gradients for a fixed random cotangent, in one jit (one compile)."""
  w = np.random.default_rng(9).standard_normal(q.shape, np.float32)

  @jax.jit
  def run(q, k, v):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(w)

  return run(q, k, v)


def assert_matches_reference(f, q, k, v, tol_fwd, tol_grad):
  (got, grads), (want, want_grads) = value_and_vjp(f, q, k, v), value_and_vjp(linear_attention_reference, q, k, v)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  assert rel_err(got, want) <= tol_fwd
  for g, g_want, x in zip(grads, want_grads, (q, k, v)):
    assert g.dtype == x.dtype  # gradients in the input dtype
    assert rel_err(np.asarray(g, np.float32), np.asarray(g_want, np.float32)) <= tol_grad


TOLERANCES = [(jnp.float32, 1e-5, 1e-4), (jnp.bfloat16, 1e-2, 3e-2)]


# n is never a multiple of the block: ragged tails. 6 heads make a ragged lane block (192 = 128 + 64).
@pytest.mark.parametrize("n,heads,block", [(37, 1, 16), (130, 3, 64), (200, 6, 64), (77, 8, 32)])
@pytest.mark.parametrize("dtype,tol_fwd,tol_grad", TOLERANCES)
def test_forward_and_gradients_match_reference(n, heads, block, dtype, tol_fwd, tol_grad):
  q, k, v = qkv((2, n, heads, 32), dtype)
  assert_matches_reference(lambda q, k, v: linear_attention_pallas(q, k, v, 1e-15, block, True), q, k, v,
                           tol_fwd, tol_grad)


# The GPU kernels (Triton lowering) in interpret mode: masked tiles at ragged ends, reductions over
# several chunks (chunk 3) and several blocks per chunk, one or many heads. Forward errors stay at
# float32 rounding for bf16 inputs too (float32 operands are split into bf16 halves, not rounded);
# bf16 gradients carry their own rounding.
@pytest.mark.parametrize("shape,block,chunk", [((2, 70, 6, 32), 32, None), ((1, 200, 2, 16), 16, 3),
                                               ((2, 17, 1, 32), 16, None)])
@pytest.mark.parametrize("dtype,tol_fwd,tol_grad", [(jnp.float32, 1e-5, 1e-4), (jnp.bfloat16, 1e-5, 3e-3)])
def test_gpu_kernels_in_interpret_mode(shape, block, chunk, dtype, tol_fwd, tol_grad):
  q, k, v = qkv(shape, dtype, seed=1)
  f = lambda q, k, v: linear_attention_gpu(q, k, v, 1e-15, block=block, chunk_blocks=chunk, interpret=True)
  assert_matches_reference(f, q, k, v, tol_fwd, tol_grad)


def test_gpu_platform_dispatches_to_the_gpu_kernels():
  q = jax.ShapeDtypeStruct((1, 40, 4, 32), jnp.bfloat16)
  f = lambda q, k, v: linear_attention_pallas(q, k, v, 1e-15, 16, True, "gpu")
  cotangent = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  jaxpr = jax.make_jaxpr(lambda q, k, v, g: jax.vjp(f, q, k, v)[1](g))(q, q, q, cotangent)
  calls = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
  assert len(calls) == 4 and all("linear_attention_gpu.py" in e.params["jaxpr"].debug_info.func_src_info for e in calls)


def test_gpu_plan_fills_the_device():
  plan = make_gpu_plan((2, 16384, 36, 32))
  assert plan.chunks * 2 * 36 >= 512 and plan.chunks * plan.chunk_blocks * plan.block >= 16384
  assert make_gpu_plan((1, 17, 1, 32)).block == 32  # short sequences: the smallest power of two that holds them
  with pytest.raises(ValueError, match="head dim 24"):
    make_gpu_plan((1, 64, 2, 24))


def test_tpu_interpret_mode():
  """Under the TPU interpreter: TPU memory spaces and grid semantics ("parallel" axes visited in a
  random order, the reduction axis in order), NaN-filled uninitialised memory, out-of-bounds reads
  raising (the default). Ragged rows and a ragged lane block."""
  q, k, v = qkv((2, 45, 6, 32), jnp.float32, seed=2)
  params = pltpu.InterpretParams(random_seed=0, uninitialized_memory="nan")
  assert_matches_reference(lambda q, k, v: linear_attention_pallas(q, k, v, 1e-15, 16, params), q, k, v,
                           1e-5, 1e-4)


def test_backward_runs_in_pallas():
  """Forward and backward are the four Pallas kernels, with no XLA matmul around them."""
  f = lambda q, k, v: linear_attention_pallas(q, k, v, 1e-15, 16, True)
  q = jax.ShapeDtypeStruct((1, 40, 4, 32), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda q, k, v, g: jax.vjp(f, q, k, v)[1](g))(q, q, q, q)
  names = [e.primitive.name for e in jaxpr.eqns]
  assert names.count("pallas_call") == 4, names
  assert "dot_general" not in names


@pytest.mark.parametrize("platform,call", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")])
def test_lowers_for_tpu_and_gpu(platform, call):
  """Forward and backward lower for real (not interpreted) on TPU (Mosaic) and GPU (Triton) from
  this CPU machine: Pallas' lowering rules accept every op and block shape. (The Mosaic and Triton
  compilers themselves run only on the device.)"""
  shape = jax.ShapeDtypeStruct((2, 77, 70, 32), jnp.bfloat16)  # 1.6B's 70 heads: 2240 = 17 x 128 + 64 lanes
  f = lambda q, k, v: linear_attention_pallas(q, k, v, 1e-15, None, False, "gpu" if platform == "cuda" else "tpu")
  grad = jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v)), (0, 1, 2))
  checks = [jax.export.DisabledSafetyCheck.custom_call(call)]  # no stability promise: fine, never serialised
  module = jax.export.export(jax.jit(grad), platforms=[platform], disabled_checks=checks)(shape, shape, shape)
  assert module.mlir_module().count(f"custom_call @{call}") == 4  # two forward, two backward kernels


def test_dit_with_pallas_equals_xla_including_grad():
  cfg = sana_jax.SanaTransformerConfig(in_channels=4, out_channels=4, num_attention_heads=4, num_layers=2,
                                       num_cross_attention_heads=2, cross_attention_head_dim=32,
                                       cross_attention_dim=128, caption_channels=16)
  # Random weights drawn in numpy into the abstract model: an eager init compiles one XLA
  # program per parameter shape, which alone took longer than the comparison on CPU.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: sana_jax.SanaTransformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(1)
  draw = lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32) / np.sqrt(np.prod(a.shape[:-1])))
  model = nnx.merge(graphdef, jax.tree.map(draw, abstract))
  x, y = rng.standard_normal((2, 5, 7, 4), np.float32), rng.standard_normal((2, 6, 16), np.float32)
  t, mask = jnp.array([0.3, 0.8]), jnp.array([[1, 1, 1, 0, 0, 0], [1] * 6])

  def output_and_grads(impl):
    model.set_attention_impl(impl)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      out = nnx.merge(graphdef, params, rest)(x, t, y, mask)
      return jnp.mean(jnp.square(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)  # one compile per impl
    return out, grads

  out_xla, g_xla = output_and_grads("xla")
  out_pallas, g_pal = output_and_grads("pallas")
  assert rel_err(out_pallas, out_xla) <= 1e-4
  flat = lambda g: np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])
  assert rel_err(flat(g_pal), flat(g_xla)) <= 1e-4  # all parameter gradients together
  scale = np.abs(flat(g_xla)).max()
  for a, b in zip(jax.tree.leaves(g_pal), jax.tree.leaves(g_xla)):  # and none off on its own
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * scale


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")
def test_kernel_runs_per_shard_under_a_mesh():
  from sana_jax import parallel
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  q, k, v = qkv((4, 45, 6, 32), jnp.float32)
  spec = jax.sharding.NamedSharding(mesh, parallel.logical_to_spec(("batch", None, "heads", None), q.shape, mesh))
  q, k, v = (jax.device_put(a, spec) for a in (q, k, v))
  with parallel.use_mesh(mesh):
    got, grads = value_and_vjp(lambda q, k, v: linear_attention(q, k, v, implementation="pallas"), q, k, v)
  assert got.sharding.spec == spec.spec  # batch over (data, fsdp), heads over tensor: no gather
  want, want_grads = value_and_vjp(linear_attention_reference, q, k, v)
  assert rel_err(got, want) <= 1e-5
  for g, g_want in zip(grads, want_grads):
    assert rel_err(g, g_want) <= 1e-4


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_kernels_sum_per_shard_when_the_tokens_are_split(platform):
  """Sequence parallelism: each device's kernels sum its own tokens, one psum joins the sums, each device
  applies them to its queries; the tokens are never gathered."""
  from sana_jax import parallel
  mesh = parallel.make_mesh(data=2, fsdp=4)
  q, k, v = qkv((2, 128, 4, 32), jnp.float32)
  with parallel.use_mesh(mesh, parallel.SAMPLING_RULES):
    mesh_, spec = dispatch._spec(q.shape)
  assert spec == jax.sharding.PartitionSpec("data", "fsdp", None, None)
  combine = lambda kv, ksum: (jax.lax.psum(kv, "fsdp"), jax.lax.psum(ksum, "fsdp"))
  kernel = lambda q, k, v: linear_attention_pallas(q, k, v, interpret=True, platform=platform, combine=combine)
  placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, spec)) for a in (q, k, v)]
  got = jax.jit(parallel.shard_map(kernel, mesh, (spec,) * 3, spec))(*placed)
  assert rel_err(got, linear_attention_reference(q, k, v)) <= 1e-5
  if platform == "tpu":  # and the dispatcher takes that path under the mesh
    with parallel.use_mesh(mesh, parallel.SAMPLING_RULES):
      got = jax.jit(lambda q, k, v: linear_attention(q, k, v, implementation="pallas"))(*placed)
    assert got.sharding.spec == spec and rel_err(got, linear_attention_reference(q, k, v)) <= 1e-5


# ---- implementation="auto" ----

@pytest.fixture
def fresh_decisions(monkeypatch):
  monkeypatch.setattr(dispatch, "_DECISIONS", {})
  monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
  return dispatch._DECISIONS


def kernels_in(f, *args):
  return str(jax.make_jaxpr(f)(*args)).count("pallas_call")


def test_decide_never_picks_the_slower():
  assert dispatch.decide({"xla": (1.0, 2.0), "pallas": (0.5, 1.0)}) == "pallas"
  assert dispatch.decide({"xla": (1.0, 2.0), "pallas": (0.5, 2.5)}) == "xla"  # faster forward, slower training
  assert dispatch.decide({"xla": (1.0, 2.0), "pallas": (0.99, 1.98)}) == "xla"  # within noise: a tie
  assert dispatch.decide({"xla": (1.0, 2.0)}) == "xla"  # the kernel failed


def test_auto_is_xla_on_cpu_without_measuring(fresh_decisions, monkeypatch):
  monkeypatch.setattr(dispatch, "_measure", lambda *a: pytest.fail("measured on CPU"))
  q, k, v = qkv((1, 16, 4, 32), jnp.float32)
  assert kernels_in(lambda q, k, v: linear_attention(q, k, v), q, k, v) == 0
  assert not fresh_decisions


def test_environment_variable_forces_a_choice(fresh_decisions, monkeypatch):
  q, k, v = qkv((1, 16, 4, 32), jnp.float32)
  monkeypatch.setattr(dispatch, "_device", lambda: ("gpu", "fake"))
  monkeypatch.setattr(dispatch, "_measure", lambda *a: pytest.fail("measured despite the override"))
  monkeypatch.setenv(dispatch.ENV_VAR, "pallas")
  assert kernels_in(lambda q, k, v: linear_attention(q, k, v), q, k, v) == 2
  monkeypatch.setenv(dispatch.ENV_VAR, "xla")
  assert kernels_in(lambda q, k, v: linear_attention(q, k, v), q, k, v) == 0
  monkeypatch.setenv(dispatch.ENV_VAR, "triton")
  with pytest.raises(ValueError, match="SANA_JAX_LINEAR_ATTENTION"):
    linear_attention(q, k, v)


def test_auto_falls_back_to_xla_when_the_kernel_does_not_lower(fresh_decisions, monkeypatch):
  """Pretend to be a GPU: the real measurement runs inside a jit trace, the compiled (non-interpret)
  kernel fails to lower on this CPU, XLA is chosen and the failure remembered."""
  monkeypatch.setattr(dispatch, "_device", lambda: ("gpu", "fake"))
  measured = []
  real = dispatch._measure
  monkeypatch.setattr(dispatch, "_measure", lambda *a: measured.append(a) or real(*a, repeats=1))
  q, k, v = qkv((2, 24, 4, 32), jnp.bfloat16)
  for _ in range(2):
    assert kernels_in(jax.jit(lambda q, k, v: linear_attention(q, k, v)), q, k, v) == 0
  assert len(measured) == 1
  assert fresh_decisions == {("gpu", "fake", (2, 24, 4, 32), "bfloat16"): "xla"}


def test_auto_takes_the_kernel_when_measured_faster(fresh_decisions, monkeypatch):
  """A fake device and timer: the kernel measured 2x faster at both passes is used, per shape."""
  monkeypatch.setattr(dispatch, "_device", lambda: ("gpu", "fake"))
  monkeypatch.setattr(dispatch, "_candidates", lambda impl, *a: (lambda: None, lambda: None))
  monkeypatch.setattr(dispatch, "_time_alternating", lambda fns, repeats: [2.0, 4.0, 1.0, 2.0])
  q, k, v = qkv((1, 24, 4, 32), jnp.float32)
  assert kernels_in(lambda q, k, v: linear_attention(q, k, v), q, k, v) == 2
  assert fresh_decisions == {("gpu", "fake", (1, 24, 4, 32), "float32"): "pallas"}
  monkeypatch.setattr(dispatch, "_time_alternating", lambda fns, repeats: [1.0, 2.0, 1.0, 2.0])
  assert kernels_in(lambda q, k, v: linear_attention(q, k, v), q[:, :16], k[:, :16], v[:, :16]) == 0


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")
def test_auto_measures_the_per_device_shape_under_a_mesh(fresh_decisions, monkeypatch):
  from sana_jax import parallel
  monkeypatch.setattr(dispatch, "_device", lambda: ("gpu", "fake"))
  monkeypatch.setattr(dispatch, "_measure", lambda shape, *a: {"xla": (1.0, 1.0)})
  q, k, v = qkv((4, 24, 6, 32), jnp.float32)
  with parallel.use_mesh(parallel.make_mesh(data=2, fsdp=2, tensor=2)):
    jax.make_jaxpr(lambda q, k, v: linear_attention(q, k, v))(q, k, v)
  assert list(fresh_decisions) == [("gpu", "fake", (1, 24, 3, 32), "float32")]
