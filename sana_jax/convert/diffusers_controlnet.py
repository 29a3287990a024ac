"""diffusers `SanaControlNetModel` checkpoints <-> sana_jax.SanaControlNetModel.

The transformer's rows (diffusers_dit.TABLE) without its output layer and guidance embedding, plus the
input and per-block output projections.
"""
import dataclasses

from sana_jax.convert import diffusers_dit, invert, loading, safetensors_io
from sana_jax.convert.table import IDENTITY, LINEAR
from sana_jax.models.controlnet import SanaControlNetModel
from sana_jax.models.dit import SanaTransformerConfig

_OUTPUT_LAYER = ("scale_shift_table", "proj_out.kernel", "proj_out.bias")
TABLE = [row for row in diffusers_dit.TABLE if row[1] not in _OUTPUT_LAYER and "guidance" not in row[1]] + [
    (r"input_block\.weight", "input_block.kernel", LINEAR),
    (r"input_block\.bias", "input_block.bias", IDENTITY),
    (r"controlnet_blocks\.(\d+)\.weight", "controlnet_blocks.{layer}.kernel", LINEAR),
    (r"controlnet_blocks\.(\d+)\.bias", "controlnet_blocks.{layer}.bias", IDENTITY),
]
CLASS_NAME = "SanaControlNetModel"
CONFIG = (  # SanaControlNetModel's config.json
    "in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
    "num_cross_attention_heads", "cross_attention_head_dim", "cross_attention_dim", "caption_channels", "mlp_ratio",
    "dropout", "attention_bias", "sample_size", "patch_size", "norm_elementwise_affine", "norm_eps",
    "interpolation_scale")


def read_config(path, **overrides):
  """The SanaTransformerConfig (ControlNet fields only) of a diffusers ControlNet directory (or a
  pipeline's controlnet/)."""
  path = loading.resolve_dir(path, "controlnet")
  raw = {**loading.read_config(path, CLASS_NAME), **overrides}
  return path, SanaTransformerConfig.from_dict(raw, source=f"{path}/config.json")


def load(path, *, dtype, param_dtype, attention_impl="xla", mesh=None, rules=None, **overrides):
  path, cfg = read_config(path, **overrides)
  weights = safetensors_io.read_dir(path, "diffusion_pytorch_model")
  return loading.load_dit_family(weights, SanaControlNetModel, cfg, TABLE, dtype=dtype, param_dtype=param_dtype,
                                 attention_impl=attention_impl, mesh=mesh, rules=rules, source=path)


def component(model):
  """The export plan: diffusers' names for every weight, and its config.json."""
  cfg = model.config
  state = invert.flat_state(model)
  entries = invert.plan(state, TABLE, optional={r"emb\.": True}, source="controlnet")
  invert.check_names(entries, TABLE, "controlnet")
  config = {k: v for k, v in {**dataclasses.asdict(cfg), "dropout": 0.0}.items() if k in CONFIG}
  return invert.Component(config, cfg, entries, state, "diffusion_pytorch_model", "diffusers", CLASS_NAME)
