"""Parameters sharded over an (fsdp=4, tensor=2) mesh of 8 simulated CPU devices."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from reference import rel_err
from test_dit_parity import make_reference, odd_inputs

import sana_jax
from sana_jax import parallel
from sana_jax.models.dit import pure_forward

WIDE = dict(num_attention_heads=4, num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=128,
            qk_norm="rms_norm_across_heads")

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")


def test_mesh_shapes():
  mesh = parallel.make_mesh(data=-1, fsdp=4, tensor=2)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  with pytest.raises(sana_jax.SanaError, match="devices"):
    parallel.make_mesh(data=3, fsdp=4, tensor=2)


def test_sharded_forward_equals_single_device(tmp_path):
  make_reference(tmp_path, **WIDE)
  single = sana_jax.SanaTransformer.from_pretrained(tmp_path)
  mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
  sharded = sana_jax.SanaTransformer.from_pretrained(tmp_path, mesh=mesh)

  # the big weights really are split: stacked q kernel [layers, D, D] over (fsdp, tensor)
  q = sharded.blocks.attn1.to_q.kernel[...]
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4, q.shape[2] // 2)
  ffn = sharded.blocks.ff.conv_inverted.kernel[...]  # [layers, D, 2, hidden]
  assert ffn.sharding.spec == P(None, "fsdp", None, "tensor")
  out_proj = sharded.blocks.attn2.to_out.kernel[...]
  assert out_proj.sharding.spec == P(None, "tensor", "fsdp")
  assert len({s.device for s in q.addressable_shards}) == 8

  x, t, y, mask = odd_inputs({**WIDE, "in_channels": 4, "caption_channels": 40}, batch=4, h=6, w=10)
  expected = np.asarray(single(x, t, y, mask))

  apply, state = pure_forward(sharded)
  batch = lambda a: jax.device_put(a, parallel.batch_sharding(mesh, a.ndim))
  with parallel.use_mesh(mesh):  # traced inside: activations stay batch-split between blocks
    got = jax.jit(apply)(state, batch(x), batch(t), batch(y), batch(mask))
  assert got.sharding.spec[0] in (("data", "fsdp"), "fsdp")  # the output stays batch-split
  assert rel_err(np.asarray(got), expected) <= 1e-5


def test_logical_spec_skips_indivisible_and_reused_axes():
  mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
  assert parallel.logical_to_spec(("embed", "heads"), (8, 6), mesh) == P("fsdp", "tensor")
  assert parallel.logical_to_spec(("embed", "heads"), (6, 6), mesh) == P(None, "tensor")  # 6 % 4 != 0
  assert parallel.logical_to_spec(("embed", "embed"), (8, 8), mesh) == P("fsdp", None)
  rules = parallel.rules_from_config({"embed": None})
  assert parallel.logical_to_spec(("embed", "heads"), (8, 8), mesh, rules) == P(None, "tensor")


def test_logical_spec_is_always_valid():
  """For any dims and logical names: no mesh axis used twice, every split dim divisible."""
  from hypothesis import given, settings
  from hypothesis import strategies as st
  mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
  names = st.sampled_from([None, "batch", "embed", "embed_out", "heads", "mlp", "layers", "caption"])

  @settings(max_examples=200, deadline=None)
  @given(st.lists(st.tuples(names, st.integers(1, 64)), min_size=1, max_size=5))
  def check(dims):
    spec = parallel.logical_to_spec([n for n, _ in dims], [s for _, s in dims], mesh)
    used = []
    for entry, (_, size) in zip(spec, dims):
      axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      used += axes
      assert size % int(np.prod([mesh.shape[a] for a in axes] or [1])) == 0
    assert len(used) == len(set(used))

  check()


@pytest.mark.xfail(strict=True, reason="known bug, not traced: on a data=2 x fsdp=2 x tensor=2 mesh with 4 x 4 "
                   "latents (6 x 10 and 8 x 8 are right) the output is wrong on XLA:CPU, with Shardy and GSPMD alike, "
                   "without XNNPACK too; each layer alone is right. Passing here means it is fixed: drop the mark")
def test_forward_on_a_three_axis_mesh_equals_single_device(tmp_path):
  make_reference(tmp_path, **WIDE)
  single = sana_jax.SanaTransformer.from_pretrained(tmp_path)
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  apply, state = pure_forward(sana_jax.SanaTransformer.from_pretrained(tmp_path, mesh=mesh))
  x, t, y, mask = odd_inputs({**WIDE, "in_channels": 4, "caption_channels": 40}, batch=8, h=4, w=4)
  batch = lambda a: jax.device_put(a, parallel.batch_sharding(mesh, a.ndim))
  with parallel.use_mesh(mesh):
    got = jax.jit(apply)(state, batch(x), batch(t), batch(y), batch(mask))
  assert rel_err(np.asarray(got), np.asarray(single(x, t, y, mask))) <= 1e-5
