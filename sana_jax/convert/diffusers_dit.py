"""diffusers `SanaTransformer2DModel` checkpoints <-> sana_jax.SanaTransformer."""
import dataclasses

from sana_jax.convert import invert, loading, safetensors_io
from sana_jax.convert.table import CONV1X1, GLU_DEPTHWISE, GLU_EXPAND, IDENTITY, LINEAR, SPLIT_TWO, Transform
from sana_jax.errors import SanaError, short
from sana_jax.models.dit import SanaTransformer, SanaTransformerConfig

# [D, C, p, p] <-> [(row, col, C), D], the order patchify flattens tokens in
PATCH_CONV = Transform(
    "patch_conv", lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
    lambda w, cfg: w.reshape(cfg.patch_size, cfg.patch_size, -1, w.shape[-1]).transpose(3, 2, 0, 1))
ADALN_KERNEL = Transform("adaln_kernel", lambda w: w.T.reshape(w.shape[1], 6, -1),  # [6D, D] <-> [D, 6, D]
                         lambda w, cfg: w.reshape(w.shape[0], -1).T)
SIX = Transform("six", lambda b: b.reshape(6, -1), lambda b, cfg: b.reshape(-1))  # [6D] <-> [6, D]

_B = r"transformer_blocks\.(\d+)\."
_T = r"time_embed\.(?:emb\.)?"  # diffusers nests the embedder under emb. without a guidance embedding
TABLE = [
    (r"patch_embed\.proj\.weight", "patch_embed.kernel", PATCH_CONV),
    (r"patch_embed\.proj\.bias", "patch_embed.bias", IDENTITY),
    (_T + r"timestep_embedder\.linear_([12])\.weight", r"time_embed.timestep_embedder.linear_\1.kernel", LINEAR),
    (_T + r"timestep_embedder\.linear_([12])\.bias", r"time_embed.timestep_embedder.linear_\1.bias", IDENTITY),
    (r"time_embed\.guidance_embedder\.linear_([12])\.weight", r"time_embed.guidance_embedder.linear_\1.kernel", LINEAR),
    (r"time_embed\.guidance_embedder\.linear_([12])\.bias", r"time_embed.guidance_embedder.linear_\1.bias", IDENTITY),
    (r"time_embed\.linear\.weight", "time_embed.linear.kernel", ADALN_KERNEL),
    (r"time_embed\.linear\.bias", "time_embed.linear.bias", SIX),
    (r"caption_projection\.linear_([12])\.weight", r"caption_projection.linear_\1.kernel", LINEAR),
    (r"caption_projection\.linear_([12])\.bias", r"caption_projection.linear_\1.bias", IDENTITY),
    (r"caption_norm\.weight", "caption_norm.weight", IDENTITY),
    (_B + r"(attn[12])\.to_([qkv])\.weight", r"blocks.{layer}.\2.to_\3.kernel", LINEAR),
    (_B + r"(attn[12])\.to_([qkv])\.bias", r"blocks.{layer}.\2.to_\3.bias", IDENTITY),
    (_B + r"(attn[12])\.to_out\.0\.weight", r"blocks.{layer}.\2.to_out.kernel", LINEAR),
    (_B + r"(attn[12])\.to_out\.0\.bias", r"blocks.{layer}.\2.to_out.bias", IDENTITY),
    (_B + r"(attn[12])\.norm_([qk])\.weight", r"blocks.{layer}.\2.norm_\3.weight", IDENTITY),
    (_B + r"norm2\.(weight|bias)", r"blocks.{layer}.norm2.\2", IDENTITY),
    (_B + r"ff\.conv_inverted\.weight", "blocks.{layer}.ff.conv_inverted.kernel", GLU_EXPAND),
    (_B + r"ff\.conv_inverted\.bias", "blocks.{layer}.ff.conv_inverted.bias", SPLIT_TWO),
    (_B + r"ff\.conv_depth\.weight", "blocks.{layer}.ff.conv_depth_kernel", GLU_DEPTHWISE),
    (_B + r"ff\.conv_depth\.bias", "blocks.{layer}.ff.conv_depth_bias", SPLIT_TWO),
    (_B + r"ff\.conv_point\.weight", "blocks.{layer}.ff.conv_point.kernel", CONV1X1),
    (_B + r"scale_shift_table", "blocks.{layer}.scale_shift_table", IDENTITY),
    (r"scale_shift_table", "scale_shift_table", IDENTITY),
    (r"proj_out\.weight", "proj_out.kernel", LINEAR),
    (r"proj_out\.bias", "proj_out.bias", IDENTITY),
]
# LoRA: how a kernel's two factors map, per the kernel's transform. lora_A is shaped like a weight with
# r outputs (down, [din, r], takes the input side of the transform) and lora_B like a 1x1 weight with
# r inputs (up, [r, *dout], takes the output side): kernel + down @ up is the kernel of W + B @ A.
LORA_FACTORS = {  # kernel transform -> (lora_A's, lora_B's)
    LINEAR: (LINEAR, LINEAR), CONV1X1: (CONV1X1, CONV1X1), GLU_EXPAND: (CONV1X1, GLU_EXPAND),
    ADALN_KERNEL: (LINEAR, ADALN_KERNEL), PATCH_CONV: (PATCH_CONV, CONV1X1),
}
CLASS_NAME = "SanaTransformer2DModel"
OURS_ONLY = ("linear_attention_eps", "remat", "scan_unroll")  # runtime options, not in diffusers' config


def read_config(path, **overrides):
  """The SanaTransformerConfig of a diffusers transformer directory (or a pipeline's transformer/)."""
  path = loading.resolve_dir(path, "transformer")
  source = f"{path}/config.json"
  raw = {**upgrade_config(loading.read_config(path, CLASS_NAME), source), **overrides}
  from sana_jax.quant import saving as quantization  # it imports this module
  quantization.read_mode(raw, source)  # checked here; `load` acts on it
  raw.pop("quantization_config", None)
  return path, SanaTransformerConfig.from_dict(raw, source=source)


# diffusers' Sana transformer before its release (pre-merge configs): keys whose only meaningful value
# is today's layout, and keys that do not change the model (caption_norm_scale_factor only set the
# initial value of caption_norm.weight, which every checkpoint holds)
_PRE_MERGE_FIXED = {"activation_fn": ["silu", "silu", None], "ff_bias": [True, True, False],
                    "ff_norm": [None, None, None], "norm_type": "ada_norm_single", "use_caption_norm": True,
                    "attention_type": "default", "upcast_attention": False, "use_additional_conditions": None}
_PRE_MERGE_UNUSED = ("caption_norm_scale_factor", "num_embeds_ada_norm", "norm_num_groups")


def upgrade_config(raw, source="transformer config"):
  """A pre-merge diffusers transformer config in today's keys where the meaning is certain (expand_ratio
  is mlp_ratio; use_pe false is no position embedding, interpolation_scale None); anything else one line."""
  raw = dict(raw)
  for key, value in _PRE_MERGE_FIXED.items():
    if key in raw:
      got = raw.pop(key)
      got = list(got) if isinstance(got, (list, tuple)) else got
      if got != value and not (key == "use_additional_conditions" and got is False):
        raise SanaError(f"{source}: {key} = {short(got)} (a pre-release diffusers config) has no equivalent in "
                        f"SanaTransformer2DModel, which fixes it to {value!r}")
  for key in _PRE_MERGE_UNUSED:
    raw.pop(key, None)
  if "expand_ratio" in raw:
    ratio = raw.pop("expand_ratio")
    if raw.setdefault("mlp_ratio", ratio) != ratio:
      raise SanaError(f"{source}: expand_ratio {short(ratio)} and mlp_ratio {short(raw['mlp_ratio'])} disagree")
  if "use_pe" in raw:
    if raw.pop("use_pe") is not False:
      raise SanaError(f"{source}: use_pe (a pre-release diffusers config) also added a 1-D position embedding in "
                      f"every block, which SanaTransformer2DModel has not; convert the original .pth with "
                      f"`python -m sana_jax.convert` instead")
    raw["interpolation_scale"] = None  # before the merge use_pe, not interpolation_scale, decided
  return raw


def load(path, *, dtype, param_dtype, attention_impl="xla", mesh=None, rules=None, **overrides):
  """The SanaTransformer of a diffusers directory, or the quantized one sana_jax.quant saved."""
  from sana_jax.quant import saving as quantization
  path, cfg = read_config(path, **overrides)
  mode = quantization.read_mode(loading.read_config(path), path)
  if mode is not None:
    return quantization.load(path, cfg, mode, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                             mesh=mesh, rules=rules)
  return loading.load_dit_family(safetensors_io.read_dir(path, "diffusion_pytorch_model"), SanaTransformer, cfg, TABLE,
                                 dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, mesh=mesh,
                                 rules=rules, source=path)


def export_plan(cfg, state):
  """invert.plan's entries for a flat state {path: array or shape struct} of a model with config cfg."""
  # diffusers nests the timestep embedder under `emb.` (AdaLayerNormSingle) unless a guidance
  # embedding is present (SanaCombinedTimestepGuidanceEmbeddings)
  return invert.plan(state, TABLE, optional={r"emb\.": not cfg.guidance_embeds}, source="transformer")


def config_json(cfg):
  """config.json's fields of a SanaTransformerConfig, as diffusers writes them."""
  return {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in OURS_ONLY}, "dropout": 0.0}


def component(model):
  """The export plan: diffusers' names for every weight, and its config.json (a quantized model's is
  sana_jax.quant.saving's)."""
  from sana_jax.quant import saving as quantization
  if quantization.quant_model.mode_of(model) is not None:
    return quantization.component(model)
  cfg = model.config
  state = invert.flat_state(model)
  entries = export_plan(cfg, state)
  invert.check_names(entries, TABLE, "transformer")
  return invert.Component(config_json(cfg), cfg, entries, state, "diffusion_pytorch_model", "diffusers",
                          CLASS_NAME)
