"""diffusers `SanaTransformer2DModel` checkpoints -> sana_jax.SanaTransformer."""
from flax import nnx

from sana_jax.convert import loading
from sana_jax.convert.table import conv1x1, glu_depthwise, glu_expand, identity, linear, split_two
from sana_jax.models.dit import SanaTransformer, SanaTransformerConfig


def _patch_conv(w):  # [D, C, p, p] -> [(row, col, C), D], the order patchify flattens tokens in
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _adaln_kernel(w):  # [6D, D] -> [D, 6, D]
  return w.T.reshape(w.shape[1], 6, -1)


def _six(b):  # [6D] -> [6, D]
  return b.reshape(6, -1)


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
    (_B + r"ff\.conv_inverted\.weight", "blocks.{layer}.ff.conv_inverted.kernel", glu_expand),
    (_B + r"ff\.conv_inverted\.bias", "blocks.{layer}.ff.conv_inverted.bias", split_two),
    (_B + r"ff\.conv_depth\.weight", "blocks.{layer}.ff.conv_depth_kernel", glu_depthwise),
    (_B + r"ff\.conv_depth\.bias", "blocks.{layer}.ff.conv_depth_bias", split_two),
    (_B + r"ff\.conv_point\.weight", "blocks.{layer}.ff.conv_point.kernel", conv1x1),
    (_B + r"scale_shift_table", "blocks.{layer}.scale_shift_table", identity),
    (r"scale_shift_table", "scale_shift_table", identity),
    (r"proj_out\.weight", "proj_out.kernel", linear),
    (r"proj_out\.bias", "proj_out.bias", identity),
]


def load(path, *, dtype, param_dtype, attention_impl="xla", mesh=None, rules=None, **overrides):
  path = loading.resolve_dir(path, "transformer")
  raw = loading.read_config(path, "SanaTransformer2DModel")
  raw.update(overrides)
  cfg = SanaTransformerConfig.from_dict(raw)
  build = lambda: SanaTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                  attention_impl=attention_impl)
  return loading.load_weights(path, build, TABLE, num_layers=cfg.num_layers, mesh=mesh, rules=rules)
