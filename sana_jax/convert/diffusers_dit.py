"""diffusers `SanaTransformer2DModel` checkpoints -> sana_jax.SanaTransformer."""
import json
import os

import jax
import numpy as np
from flax import nnx, traverse_util

from sana_jax import parallel
from sana_jax.convert import safetensors_io
from sana_jax.convert.table import conv1x1, convert, identity, linear
from sana_jax.errors import SanaError
from sana_jax.models.dit import SanaTransformer, SanaTransformerConfig


def _patch_conv(w):  # [D, C, p, p] -> [(row, col, C), D], the order patchify flattens tokens in
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _adaln_kernel(w):  # [6D, D] -> [D, 6, D]
  return w.T.reshape(w.shape[1], 6, -1)


def _six(b):  # [6D] -> [6, D]
  return b.reshape(6, -1)


def _two(b):  # [2h] -> [2, h]: GLU value and gate halves
  return b.reshape(2, -1)


def _glu_expand(w):  # [2h, D, 1, 1] -> [D, 2, h]
  return conv1x1(w).reshape(w.shape[1], 2, -1)


def _glu_depthwise(w):  # [2h, 1, 3, 3] -> [3, 3, 2, h]
  return w[:, 0].transpose(1, 2, 0).reshape(3, 3, 2, -1)


_B = r"transformer_blocks\.(\d+)\."
TABLE = [
    (r"patch_embed\.proj\.weight", "patch_embed.kernel", _patch_conv),
    (r"patch_embed\.proj\.bias", "patch_embed.bias", identity),
    (r"time_embed\.(?:emb\.)?timestep_embedder\.linear_([12])\.weight", r"time_embed.timestep_embedder.linear_\1.kernel", linear),
    (r"time_embed\.(?:emb\.)?timestep_embedder\.linear_([12])\.bias", r"time_embed.timestep_embedder.linear_\1.bias", identity),
    (r"time_embed\.guidance_embedder\.linear_([12])\.weight", r"time_embed.guidance_embedder.linear_\1.kernel", linear),
    (r"time_embed\.guidance_embedder\.linear_([12])\.bias", r"time_embed.guidance_embedder.linear_\1.bias", identity),
    (r"time_embed\.linear\.weight", "time_embed.linear.kernel", _adaln_kernel),
    (r"time_embed\.linear\.bias", "time_embed.linear.bias", _six),
    (r"caption_projection\.linear_([12])\.weight", r"caption_projection.linear_\1.kernel", linear),
    (r"caption_projection\.linear_([12])\.bias", r"caption_projection.linear_\1.bias", identity),
    (r"caption_norm\.weight", "caption_norm.weight", identity),
    (_B + r"(attn[12])\.to_([qkv])\.weight", r"blocks.{layer}.\2.to_\3.kernel", linear),
    (_B + r"(attn[12])\.to_([qkv])\.bias", r"blocks.{layer}.\2.to_\3.bias", identity),
    (_B + r"(attn[12])\.to_out\.0\.weight", r"blocks.{layer}.\2.to_out.kernel", linear),
    (_B + r"(attn[12])\.to_out\.0\.bias", r"blocks.{layer}.\2.to_out.bias", identity),
    (_B + r"(attn[12])\.norm_([qk])\.weight", r"blocks.{layer}.\2.norm_\3.weight", identity),
    (_B + r"norm2\.(weight|bias)", r"blocks.{layer}.norm2.\2", identity),
    (_B + r"ff\.conv_inverted\.weight", "blocks.{layer}.ff.conv_inverted.kernel", _glu_expand),
    (_B + r"ff\.conv_inverted\.bias", "blocks.{layer}.ff.conv_inverted.bias", _two),
    (_B + r"ff\.conv_depth\.weight", "blocks.{layer}.ff.conv_depth_kernel", _glu_depthwise),
    (_B + r"ff\.conv_depth\.bias", "blocks.{layer}.ff.conv_depth_bias", _two),
    (_B + r"ff\.conv_point\.weight", "blocks.{layer}.ff.conv_point.kernel", conv1x1),
    (_B + r"scale_shift_table", "blocks.{layer}.scale_shift_table", identity),
    (r"scale_shift_table", "scale_shift_table", identity),
    (r"proj_out\.weight", "proj_out.kernel", linear),
    (r"proj_out\.bias", "proj_out.bias", identity),
]


def resolve_dir(path):
  """A transformer directory, or a pipeline directory holding one under transformer/."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise SanaError(f"model directory {path!r} does not exist")
  if os.path.exists(os.path.join(path, "config.json")):
    return path
  sub = os.path.join(path, "transformer")
  if os.path.exists(os.path.join(sub, "config.json")):
    return sub
  raise SanaError(f"{path}: no config.json (nor transformer/config.json) found")


def read_config(path, **overrides):
  with open(os.path.join(path, "config.json")) as f:
    raw = json.load(f)
  if raw.get("_class_name", "SanaTransformer2DModel") != "SanaTransformer2DModel":
    raise SanaError(f"{path}/config.json describes a {raw['_class_name']}, not a SanaTransformer2DModel")
  raw.update(overrides)
  return SanaTransformerConfig.from_dict(raw)


def load(path, *, dtype, param_dtype, attention_impl="xla", mesh=None, rules=None, **overrides):
  path = resolve_dir(path)
  cfg = read_config(path, **overrides)
  build = lambda: SanaTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                  attention_impl=attention_impl)
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  flat_abstract = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
  expected = {tuple(map(str, k)): v.shape for k, v in flat_abstract.items()}
  weights = convert(safetensors_io.read_dir(path, "diffusion_pytorch_model"), TABLE, expected,
                    cfg.num_layers, source=path)
  shardings = None
  if mesh is not None:
    shardings = parallel.state_shardings(abstract, mesh, rules)
    shardings = {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(shardings)).items()}
  arrays = {}
  for key, abstract_leaf in flat_abstract.items():
    # cast on the host and transfer once; with a mesh each device receives only its own shard
    value = np.asarray(weights[tuple(map(str, key))]).astype(abstract_leaf.dtype)
    arrays[key] = jax.device_put(value, shardings[tuple(map(str, key))] if shardings else None)
  nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(arrays))
  return nnx.merge(graphdef, abstract)
