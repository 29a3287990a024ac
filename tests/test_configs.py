"""The configs describe the released models: parameter counts equal the reference's."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sana_jax
from configs import common

EXPECTED = {  # diffusers SanaTransformer2DModel parameter counts (32 latent channels, caption 2304)
    "sana_600m": 591_747_872,
    "sana_1600m": 1_604_462_752,
    "sana15_4800m": 4_721_825_952,
}


def param_count(model_cfg):
  cfg = sana_jax.SanaTransformerConfig.from_dict(model_cfg)
  abstract = nnx.eval_shape(lambda: sana_jax.SanaTransformer(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name,res", [(n, r) for n in ("sana_600m", "sana_1600m") for r in common.RESOLUTIONS]
                         + [("sana15_4800m", 1024)])
def test_parameter_count_matches_reference(name, res):
  c = importlib.import_module(f"configs.{name}").get_config(f"res={res}")
  assert param_count(c.model) == EXPECTED[name]
  assert c.model.sample_size == c.data.latent_size == res // 32
  assert (c.model.interpolation_scale is not None) == (res >= 2048)


def test_sana15_and_sprint_variants():
  from configs import sana15_1600m, sana_sprint_1600m
  assert sana15_1600m.get_config().model.qk_norm == "rms_norm_across_heads"
  sprint = sana_sprint_1600m.get_config().model
  assert sprint.guidance_embeds and sprint.qk_norm == "rms_norm_across_heads"
  assert param_count(sprint) > EXPECTED["sana_1600m"]  # + guidance embedder + qk norms


def test_runlocal_builds_and_runs():
  from configs import sana_600m
  c = sana_600m.get_config("res=512,runlocal")
  model = sana_jax.SanaTransformer(sana_jax.SanaTransformerConfig.from_dict(c.model), rngs=nnx.Rngs(0))
  x = jnp.ones((1, c.model.sample_size, c.model.sample_size, 32))
  out = model(x, jnp.array([0.5]), jnp.ones((1, 5, c.model.caption_channels)), jnp.ones((1, 5)))
  assert out.shape == x.shape and bool(jnp.isfinite(out).all())


def test_parse_arg_rejects_unknown_keys():
  with pytest.raises(ValueError, match="resolution"):
    common.parse_arg("resolution=1024", res=1024)
  assert common.parse_arg("res=2048,runlocal", res=1024, runlocal=False).to_dict() == {"res": 2048, "runlocal": True}


@pytest.mark.parametrize("name", ["f32c32-sana", "f32c32-in", "f64c128-mix", "f128c512-in"])
def test_dcae_configs_match_diffusers_parameter_count(name):
  """Our DC-AE built from configs/dcae.py has exactly diffusers' parameters (counted on torch's meta device)."""
  import diffusers
  import torch

  from configs import dcae
  model_cfg = dcae.get_config(f"name={name}").model.to_dict()
  with torch.device("meta"):
    ref = diffusers.AutoencoderDC(**model_cfg)
  ref_count = sum(p.numel() for p in ref.parameters())
  ref_count += sum(b.numel() for n, b in ref.named_buffers() if "running_" in n)  # batch-norm statistics
  cfg = sana_jax.DCAEConfig.from_dict(model_cfg)
  abstract = nnx.eval_shape(lambda: sana_jax.DCAE(cfg, rngs=nnx.Rngs(0)))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))
  assert ours == ref_count
  assert cfg.spatial_compression == int(name[1:name.index("c", 1)])


def test_demo_config_describes_the_shipped_dit():
  """configs/demo_shapes.py with the shipped settings builds exactly the architecture in the asset."""
  import json
  import os

  from configs import demo_shapes
  with open(os.path.join(os.path.dirname(sana_jax.__file__), "assets/sana-shapes/transformer/config.json")) as f:
    shipped = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
  model = demo_shapes.get_config("layers=8,pe").model
  assert {k: model[k] for k in shipped if k in model} == {k: v for k, v in shipped.items() if k in model}
  assert sana_jax.SanaTransformerConfig.from_dict(model.to_dict()) == sana_jax.SanaTransformerConfig.from_dict(shipped)
