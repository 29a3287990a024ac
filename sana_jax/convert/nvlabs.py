"""Checkpoints in the original NVlabs/Sana layout (the repository's .pth files) <-> diffusers names.

Rows are (original name regex, diffusers name template(s) or None), read both ways. Several templates
split the original tensor along its first axis into equal parts, as diffusers' converter does (the
self-attention's fused qkv into to_q / to_k / to_v, the cross-attention's kv_linear into to_k / to_v);
read backwards the parts are concatenated. None consumes a key diffusers has no place for: pos_embed (a
buffer recomputed from the config), y_embedder.y_embedding (the null caption of training's caption
dropout), logvar_linear (Sprint's training-time loss weighting).

A file is read by `read_checkpoint` (a .pth through torch_files, which runs no pickled code, or an
original-layout .safetensors), its config inferred from the tensors (`infer_config`), and converted
either into our model (`load`, SanaTransformer.from_single_file) or, streaming one tensor at a time,
into diffusers-format directories (`convert`, the `python -m sana_jax.convert` command).
"""
import math
import os
import re
import shutil

import numpy as np

from sana_jax import dtypes, files
from sana_jax.convert import diffusers_dit, invert, loading, safetensors_io, torch_files, writing
from sana_jax.errors import SanaError, short
from sana_jax.models.dit import SanaTransformerConfig


def _embedding_rows(guidance):
  # diffusers nests the timestep embedder under `emb.` unless a guidance embedding (Sprint) sits beside it
  time = "time_embed." if guidance else "time_embed.emb."
  rows = [
      (r"x_embedder\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
      (r"t_embedder\.mlp\.0\.(weight|bias)", time + r"timestep_embedder.linear_1.\1"),
      (r"t_embedder\.mlp\.2\.(weight|bias)", time + r"timestep_embedder.linear_2.\1"),
      (r"t_block\.1\.(weight|bias)", r"time_embed.linear.\1"),
      (r"y_embedder\.y_proj\.fc1\.(weight|bias)", r"caption_projection.linear_1.\1"),
      (r"y_embedder\.y_proj\.fc2\.(weight|bias)", r"caption_projection.linear_2.\1"),
      (r"attention_y_norm\.weight", "caption_norm.weight"),
  ]
  if guidance:
    rows += [(r"cfg_embedder\.mlp\.0\.(weight|bias)", r"time_embed.guidance_embedder.linear_1.\1"),
             (r"cfg_embedder\.mlp\.2\.(weight|bias)", r"time_embed.guidance_embedder.linear_2.\1")]
  return rows


def _block_rows(src, dst):
  """One DiT block: `src` a regex whose group 1 is the block index, `dst` its diffusers prefix."""
  return [
      (src + r"scale_shift_table", dst + "scale_shift_table"),
      (src + r"attn\.qkv\.(weight|bias)", tuple(dst + f"attn1.to_{x}.\\2" for x in "qkv")),
      (src + r"attn\.proj\.(weight|bias)", dst + r"attn1.to_out.0.\2"),
      (src + r"attn\.([qk])_norm\.weight", dst + r"attn1.norm_\2.weight"),  # Sana 1.5, Sprint
      (src + r"cross_attn\.q_linear\.(weight|bias)", dst + r"attn2.to_q.\2"),
      (src + r"cross_attn\.kv_linear\.(weight|bias)", (dst + r"attn2.to_k.\2", dst + r"attn2.to_v.\2")),
      (src + r"cross_attn\.proj\.(weight|bias)", dst + r"attn2.to_out.0.\2"),
      (src + r"cross_attn\.([qk])_norm\.weight", dst + r"attn2.norm_\2.weight"),
      (src + r"mlp\.inverted_conv\.conv\.(weight|bias)", dst + r"ff.conv_inverted.\2"),
      (src + r"mlp\.depth_conv\.conv\.(weight|bias)", dst + r"ff.conv_depth.\2"),
      (src + r"mlp\.point_conv\.conv\.weight", dst + "ff.conv_point.weight"),
  ]


DROPPED = [(r"pos_embed", None), (r"y_embedder\.y_embedding", None), (r"logvar_linear\.(?:weight|bias)", None)]


def transformer_rows(guidance=False, controlnet=False):
  """SanaTransformer2DModel's rows; `controlnet`: the file also holds a ControlNet (controlnet_rows)."""
  rows = (_embedding_rows(guidance) + _block_rows(r"blocks\.(\d+)\.", r"transformer_blocks.\1.")
          + [(r"final_layer\.linear\.(weight|bias)", r"proj_out.\1"),
             (r"final_layer\.scale_shift_table", "scale_shift_table")] + DROPPED)
  return rows + [(r"controlnet\.\d+\..+", None)] if controlnet else rows


def controlnet_rows():
  """SanaControlNetModel's rows: the base's embeddings, copies of its first blocks, and the zero-initialised
  projections into (before_proj) and out of (after_proj) them. The base's own blocks are consumed."""
  return (_embedding_rows(False) + _block_rows(r"controlnet\.(\d+)\.copied_block\.", r"transformer_blocks.\1.")
          + [(r"controlnet\.0\.before_proj\.(weight|bias)", r"input_block.\1"),
             (r"controlnet\.(\d+)\.after_proj\.(weight|bias)", r"controlnet_blocks.\1.\2"),
             (r"blocks\.\d+\..+", None), (r"final_layer\..+", None)] + DROPPED)


def _parts(targets):
  return (targets,) if isinstance(targets, str) else targets


def to_diffusers(state, rows, source="checkpoint"):
  """{diffusers name: array} of an original state dict (split parts are views, nothing is copied);
  every key must match exactly one row."""
  compiled = [(re.compile(pattern + r"\Z"), targets) for pattern, targets in rows]
  out = {}
  for name, array in state.items():
    hits = [(m, targets) for rx, targets in compiled if (m := rx.match(name))]
    if len(hits) != 1:
      why = "no conversion rule matches it" if not hits else "it matches several conversion rules"
      raise SanaError(f"{source}: unexpected key {short(name)} ({why})")
    m, targets = hits[0]
    if targets is None:
      continue
    names = [m.expand(t) for t in _parts(targets)]
    if len(names) > 1 and (np.ndim(array) == 0 or array.shape[0] % len(names)):
      raise SanaError(f"{source}: key {short(name)} has shape {tuple(np.shape(array))}, which does not split "
                      f"into {len(names)} equal parts")
    for target, part in zip(names, np.split(array, len(names)) if len(names) > 1 else [array]):
      out[target] = part
  return out


def to_original(state, rows):
  """{original name: array} of diffusers-named arrays: the rows read backwards, split parts concatenated."""
  inverse = [(invert.target_regex(pattern, target), pattern, i, len(_parts(targets)))
             for pattern, targets in rows if targets is not None for i, target in enumerate(_parts(targets))]
  pieces = {}
  for name, array in state.items():
    hits = [(m, pattern, i, n) for rx, pattern, i, n in inverse if (m := rx.fullmatch(name))]
    if len(hits) != 1:
      raise SanaError(f"{name}: {len(hits)} rows of the original layout produce it, not one")
    m, pattern, i, n = hits[0]
    original = invert.unparse(pattern, {int(k[1:]): v for k, v in m.groupdict().items()}, {})
    pieces.setdefault(original, [None] * n)[i] = np.asarray(array)
  incomplete = sorted(name for name, parts in pieces.items() if any(p is None for p in parts))
  if incomplete:
    raise SanaError(f"{incomplete[0]}: some of its diffusers parts are missing")
  return {name: parts[0] if len(parts) == 1 else np.concatenate(parts) for name, parts in pieces.items()}


# ---------------------------------------------------------------------------------------------
# configs

RELEASED_WIDTHS = {  # model width -> the heads of the released sizes
    1152: dict(num_attention_heads=36, attention_head_dim=32, num_cross_attention_heads=16,
               cross_attention_head_dim=72),  # 0.6B
    2240: dict(num_attention_heads=70, attention_head_dim=32, num_cross_attention_heads=20,
               cross_attention_head_dim=112),  # 1.6B, and the 4.8B of Sana 1.5
}
PE_SCALES = {512: None, 1024: None, 2048: 1.0, 4096: 2.0}  # 512 / 1024 px models have no position embedding
LATENT_FACTOR = 32  # DC-AE f32c32: pixels per latent


def infer_config(state, resolution=None, config=None, source="checkpoint"):
  """The diffusers transformer config of an original state dict: sizes from the tensors, heads from the
  width of a released size, qk norms and the guidance embedding from the keys, sample size and position
  embedding from `resolution` (else from the pos_embed buffer's length); then `config` (a dict or a
  JSON file path: a diffusers transformer config) overrides any of it."""
  def shape(name, ndim):
    if name not in state or np.ndim(state[name]) != ndim:
      raise SanaError(f"{source}: no {ndim}-D tensor {name}; not a Sana checkpoint in the original layout")
    return np.shape(state[name])

  width, in_channels, patch, _ = shape("x_embedder.proj.weight", 4)
  depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
  out = dict(
      in_channels=in_channels, out_channels=shape("final_layer.linear.weight", 2)[0] // patch**2, num_layers=depth,
      cross_attention_dim=width, caption_channels=shape("y_embedder.y_proj.fc1.weight", 2)[1],
      mlp_ratio=shape("blocks.0.mlp.inverted_conv.conv.weight", 4)[0] / 2 / width, patch_size=patch,
      attention_bias="blocks.0.attn.qkv.bias" in state, norm_elementwise_affine=False, norm_eps=1e-6,
      qk_norm="rms_norm_across_heads" if "blocks.0.attn.q_norm.weight" in state else None,
      guidance_embeds="cfg_embedder.mlp.0.weight" in state, **RELEASED_WIDTHS.get(width, {}))
  if resolution is None and np.ndim(state.get("pos_embed")) == 3:  # [1, (sample_size / patch)^2, width]
    side = math.isqrt(state["pos_embed"].shape[1])
    if side * side == state["pos_embed"].shape[1] and side * patch * LATENT_FACTOR in PE_SCALES:
      resolution = side * patch * LATENT_FACTOR
  if resolution is not None:
    if resolution not in PE_SCALES:
      raise SanaError(f"resolution {short(resolution)}: the released Sana resolutions are "
                      f"{', '.join(map(str, PE_SCALES))}; for another, give sample_size and interpolation_scale "
                      f"in a config file")
    out.update(sample_size=resolution // LATENT_FACTOR, interpolation_scale=PE_SCALES[resolution])
  if isinstance(config, (str, os.PathLike)):
    config = files.read_json(config, "transformer config")
  out.update({k: v for k, v in dict(config or {}).items() if not k.startswith("_")})
  if "num_attention_heads" not in out:
    raise SanaError(f"{source}: width {width} is not a released Sana size ({', '.join(map(str, RELEASED_WIDTHS))}); "
                    f"give num_attention_heads, attention_head_dim, num_cross_attention_heads and "
                    f"cross_attention_head_dim in a config file")
  if "sample_size" not in out:
    raise SanaError(f"{source}: no pos_embed tells the checkpoint's resolution; give it "
                    f"({', '.join(map(str, PE_SCALES))})")
  return diffusers_dit.upgrade_config(out, source)


# ---------------------------------------------------------------------------------------------
# reading, loading, converting


def read_checkpoint(path):
  """{original name: array} of a checkpoint file: a .pth (no pickled code runs) holding {"state_dict": ...}
  or the state dict itself, or an original-layout .safetensors file. Arrays map the file, unread."""
  path = os.fspath(path)
  files.regular_file(path, "checkpoint")
  if path.endswith(".safetensors"):
    state = safetensors_io.read_file(path)
  else:
    state = torch_files.load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
      state = state["state_dict"]
  if not isinstance(state, dict) or not state or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
    what = f"keys {short(sorted(map(str, state))[:6], 120)}" if isinstance(state, dict) else type(state).__name__
    raise SanaError(f"{path}: holds no state dict of tensors ({what})")
  prefix = "model.diffusion_model."  # single files made for ComfyUI-style loaders
  if all(k.startswith(prefix) for k in state):
    state = {k[len(prefix):]: v for k, v in state.items()}
  return state


def _transformer_config(state, resolution, config, source):
  return SanaTransformerConfig.from_dict(infer_config(state, resolution, config, source), source)


def load(path, *, resolution=None, config=None, dtype="float32", param_dtype=None, attention_impl="xla",
         mesh=None, rules=None, controlnet=False):
  """SanaTransformer.from_single_file (or with `controlnet`, SanaControlNetModel's): our model from an
  original checkpoint file (a ControlNet file holds both)."""
  state = read_checkpoint(path)
  cfg = _transformer_config(state, resolution, config, path)
  kw = dict(dtype=dtype, param_dtype=param_dtype or dtype, attention_impl=attention_impl, mesh=mesh, rules=rules,
            source=path)
  if controlnet:
    from sana_jax.convert import diffusers_controlnet
    if not any(k.startswith("controlnet.") for k in state):
      raise SanaError(f"{path}: no controlnet.* weights; not a ControlNet checkpoint")
    comp = controlnet_component(state, cfg, path)
    control = SanaTransformerConfig.from_dict(comp.config, path)
    from sana_jax.models.controlnet import SanaControlNetModel
    return loading.load_dit_family(comp.weights, SanaControlNetModel, control, diffusers_controlnet.TABLE, **kw)
  weights = to_diffusers(state, transformer_rows(cfg.guidance_embeds, any(k.startswith("controlnet.") for k in state)),
                         path)
  from sana_jax.models.dit import SanaTransformer
  return loading.load_dit_family(weights, SanaTransformer, cfg, diffusers_dit.TABLE, **kw)


class Converted:
  """One diffusers component made from a checkpoint: its class, config.json and {name: array view}."""

  def __init__(self, class_name, config, weights, expected, source):
    missing = [name for name in expected if name not in weights]
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
      what = f"has no weight for {missing[0]}" if missing else f"has {extra[0]}, which {class_name} has not"
      raise SanaError(f"{source}: {what} ({len(missing)} missing, {len(extra)} unexpected); not this model's layout")
    for name, shape in expected.items():
      if tuple(weights[name].shape) != tuple(shape):
        raise SanaError(f"{source}: {name} has shape {tuple(weights[name].shape)}, expected {tuple(shape)} for "
                        f"this config")
    self.class_name, self.config, self.source = class_name, config, source
    self.weights = {name: weights[name] for name in expected}  # the model's own order

  def write(self, directory, dtype=None):
    """config.json and the weights in `dtype` (None: as stored), one tensor in memory at a time."""
    os.makedirs(directory, exist_ok=True)
    files.write_json(os.path.join(directory, "config.json"),
                     {**writing.library_header(self.class_name), **self.config}, sort_keys=True)
    dtype = None if dtype is None else dtypes.resolve(dtype)
    specs = [(name, writing.out_dtype(w.dtype, dtype), w.shape) for name, w in self.weights.items()]
    arrays = ((name, writing.cast(w, dtype, name)) for name, w in self.weights.items())
    writing.write_tensors(directory, "diffusion_pytorch_model", specs, arrays)


def transformer_component(state, cfg, source="checkpoint", controlnet=False):
  """The diffusers SanaTransformer2DModel of an original state dict, checked against config `cfg`."""
  from flax import nnx

  from sana_jax.models.dit import SanaTransformer
  comp = diffusers_dit.component(nnx.eval_shape(lambda: SanaTransformer(cfg, rngs=nnx.Rngs(0))))
  expected = {name: shape for name, _, shape in writing.specs(comp)}
  weights = to_diffusers(state, transformer_rows(cfg.guidance_embeds, controlnet), source)
  return Converted(diffusers_dit.CLASS_NAME, comp.config, weights, expected, source)


def controlnet_component(state, cfg, source="checkpoint"):
  """The diffusers SanaControlNetModel of an original ControlNet state dict (whose base has config cfg);
  the base's own blocks are checked too (transformer_component), not written."""
  import dataclasses

  from flax import nnx

  from sana_jax.convert import diffusers_controlnet
  from sana_jax.models.controlnet import SanaControlNetModel
  if cfg.qk_norm or cfg.guidance_embeds:
    raise SanaError(f"{source}: a ControlNet of a model with q/k norms or a guidance embedding has no diffusers "
                    f"layout (SanaControlNetModel has neither)")
  transformer_component(state, cfg, source, controlnet=True)
  depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"controlnet\.(\d+)\.", k)))
  control = dataclasses.replace(cfg, num_layers=depth)
  comp = diffusers_controlnet.component(nnx.eval_shape(lambda: SanaControlNetModel(control, rngs=nnx.Rngs(0))))
  expected = {name: shape for name, _, shape in writing.specs(comp)}
  weights = to_diffusers(state, controlnet_rows(), source)
  return Converted(diffusers_controlnet.CLASS_NAME, comp.config, weights, expected, source)


def convert(src, out, *, resolution=None, config=None, dtype=None, pipeline=None):
  """Writes checkpoint `src` as the diffusers-format directory `out` (whole or not at all): the transformer,
  or for a ControlNet checkpoint the ControlNet; with `pipeline` (a diffusers Sana pipeline directory) a
  whole pipeline: its text encoder, tokenizer and VAE copied, the checkpoint's model(s) and the scheduler
  the original samples with. Returns a one-line summary."""
  state = read_checkpoint(src)
  cfg = _transformer_config(state, resolution, config, src)
  is_controlnet = any(k.startswith("controlnet.") for k in state)
  transformer = transformer_component(state, cfg, src, controlnet=is_controlnet)
  controlnet = controlnet_component(state, cfg, src) if is_controlnet else None
  base = None
  if pipeline is not None:
    from sana_jax.convert import pipelines
    pipeline = pipelines.resolve_model(pipeline)
    base = pipelines.check(pipeline)["index"]  # the whole base directory is valid before anything is written
  with files.atomic_directory(out, writing.holds_saved_model) as tmp:
    if base is None:
      (controlnet or transformer).write(tmp, dtype)
    else:
      written = _write_pipeline(tmp, pipeline, base, transformer, controlnet, cfg, dtype)
  what = written if base is not None else (controlnet or transformer).class_name
  control = f", a ControlNet of {controlnet.config['num_layers']} blocks" if controlnet else ""
  return (f"{out}: {what} from {os.path.basename(src)} ({cfg.num_layers} blocks of width {cfg.inner_dim}{control}, "
          f"{cfg.sample_size * LATENT_FACTOR} px, weights in {dtype or 'their stored dtypes'})")


def _write_pipeline(directory, base_dir, base_index, transformer, controlnet, cfg, dtype):
  from sana_jax.convert import pipelines
  sprint = cfg.guidance_embeds
  class_name = "SanaSprintPipeline" if sprint else "SanaControlNetPipeline" if controlnet else "SanaPipeline"
  if sprint:
    scheduler = pipelines.scheduler_config("SCMScheduler", sigma_data=0.5)
  else:  # the original's flow shift: 6.0 for the 4K model, 3.0 otherwise
    shift = 6.0 if cfg.sample_size * LATENT_FACTOR >= 4096 else 3.0
    scheduler = pipelines.scheduler_config("DPMSolverMultistepScheduler", flow_shift=shift)
  index = {**writing.library_header(class_name), "scheduler": ["diffusers", scheduler["_class_name"]]}
  for component in (transformer, controlnet):
    if component is not None:
      name = "controlnet" if component is controlnet else "transformer"
      component.write(os.path.join(directory, name), dtype)
      index[name] = ["diffusers", component.class_name]
  for name in ("text_encoder", "tokenizer", "vae"):
    shutil.copytree(pipelines.component_dir(base_dir, name), os.path.join(directory, name))
    index[name] = base_index[name]
  os.makedirs(os.path.join(directory, "scheduler"))
  files.write_json(os.path.join(directory, "scheduler", "scheduler_config.json"), scheduler, sort_keys=True)
  files.write_json(os.path.join(directory, "model_index.json"), index, sort_keys=True)
  return class_name
