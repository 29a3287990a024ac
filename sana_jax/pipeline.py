"""SanaPipeline: prompts -> Gemma-2 embeddings -> one jitted denoising scan -> DC-AE decode -> images.

Mirrors diffusers' SanaPipeline: `SanaPipeline.from_pretrained(dir)` reads a diffusers-format Sana
directory (model_index.json with tokenizer, text_encoder, transformer, vae, scheduler).
Latents are NHWC.
"""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sana_jax import aspect_ratio, parallel
from sana_jax.errors import SanaError
from sana_jax.models.dcae import DCAE
from sana_jax.models.dit import SanaTransformer
from sana_jax.models.gemma import GemmaTextEncoder
from sana_jax.sampling import SAMPLERS, denoise
from sana_jax.text import COMPLEX_HUMAN_INSTRUCTION, PromptEncoder, load_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SCHEDULERS = {"DPMSolverMultistepScheduler": "flow_dpm", "FlowMatchEulerDiscreteScheduler": "flow_euler"}


@dataclasses.dataclass
class SanaPipelineOutput:
  images: object  # list of PIL images, or an array [B, H, W, 3] in [0, 1] ("np"), or latents ("latent")


def resolve_model(path_or_id):
  """A local directory as it is; anything else is taken for a hub id, fetched only when online."""
  path = os.fspath(path_or_id)
  if os.path.isdir(path):
    return path
  if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
    raise SanaError(f"model directory {path!r} does not exist")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path)
  except Exception as e:  # noqa: BLE001 - offline, unknown id, no access: all the user's to fix
    raise SanaError(f"cannot fetch model {path!r} from the hub: {str(e).splitlines()[0]}") from None


TEXT_SETTINGS = ("max_sequence_length", "complex_human_instruction")
DEFAULT_GUIDANCE_SCALE = 4.5  # diffusers' and the reference's


def model_settings(path):
  """Settings a pipeline directory overrides (model_index.json "sana_jax"); {} for official checkpoints.
  The shipped demo model uses no complex human instruction, short captions, and its own default
  guidance scale (the one its alignment scores best at)."""
  with open(os.path.join(path, "model_index.json")) as f:
    extra = json.load(f).get("sana_jax", {})
  unknown = sorted(set(extra) - {*TEXT_SETTINGS, "guidance_scale"})
  if unknown:
    raise SanaError(f"{path}: model_index.json has unknown sana_jax setting(s) {unknown}")
  if "complex_human_instruction" in extra:
    extra["complex_human_instruction"] = tuple(extra["complex_human_instruction"] or ())
  return extra


def text_settings(path):
  """The prompt-encoding part of `model_settings`."""
  return {k: v for k, v in model_settings(path).items() if k in TEXT_SETTINGS}


class SanaPipeline:
  def __init__(self, tokenizer, text_encoder, transformer, vae, *, sampler="flow_dpm", flow_shift=3.0,
               max_sequence_length=300, complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION, tiled_decode_above=2048,
               guidance_scale=DEFAULT_GUIDANCE_SCALE):
    self.tokenizer, self.text_encoder, self.transformer, self.vae = tokenizer, text_encoder, transformer, vae
    self.sampler, self.flow_shift = sampler, flow_shift
    self.guidance_scale = guidance_scale  # what __call__ uses when given none
    self.text_settings = dict(max_sequence_length=max_sequence_length,
                              complex_human_instruction=tuple(complex_human_instruction or ()))
    self.prompt_encoder = PromptEncoder(tokenizer, text_encoder, max_sequence_length=max_sequence_length,
                                        complex_human_instruction=complex_human_instruction)
    self.vae_scale_factor = vae.config.spatial_compression
    self.tiled_decode_above = tiled_decode_above
    self._dit_graph, self._dit_state = nnx.split(transformer)
    # several local devices: the batch (CFG pairs and prompts) is split over them, weights replicated
    self.mesh = parallel.make_mesh(data=-1, devices=jax.local_devices()) if jax.local_device_count() > 1 else None
    if self.mesh is not None:
      self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self._dit_state = jax.device_put(self._dit_state, self._replicated)
    self._generate = jax.jit(self._generate_impl, static_argnames=("sampler", "steps", "cfg", "pag", "pag_layers"))
    self._decode = vae._pure("decode")

  @classmethod
  def from_pretrained(cls, path, dtype=jnp.float32, *, sampler=None, **kwargs):
    components = {**cls.components_from_pretrained(path, dtype), **kwargs}  # the caller's settings win
    default_sampler = components.pop("sampler")
    return cls(**components, sampler=sampler or default_sampler)

  @staticmethod
  def components_from_pretrained(path, dtype=jnp.float32, *, transformer=True):
    """The pipeline's parts from a diffusers-format directory (or hub id), as constructor keywords;
    transformer=False leaves the DiT out (training samples with the model being trained)."""
    path = resolve_model(path)
    index_path = os.path.join(path, "model_index.json")
    if not os.path.exists(index_path):
      raise SanaError(f"{path}: no model_index.json; expected a diffusers-format Sana directory")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
      sched = json.load(f)
    if sched.get("_class_name") not in SCHEDULERS:
      raise SanaError(f"scheduler {sched.get('_class_name')!r} is not supported; expected one of {sorted(SCHEDULERS)}")
    parts = dict(tokenizer=load_tokenizer(os.path.join(path, "tokenizer")),
                 text_encoder=GemmaTextEncoder.from_pretrained(os.path.join(path, "text_encoder"), dtype=dtype),
                 vae=DCAE.from_pretrained(os.path.join(path, "vae"), dtype=dtype),
                 sampler=SCHEDULERS[sched["_class_name"]], flow_shift=sched.get("flow_shift", sched.get("shift", 3.0)),
                 **model_settings(path))
    if transformer:
      parts["transformer"] = SanaTransformer.from_pretrained(os.path.join(path, "transformer"), dtype=dtype)
    return parts

  def save_pretrained(self, directory, dtype="float32", **kwargs):
    """Writes the pipeline in diffusers' format (model_index.json + components), loadable by diffusers'
    SanaPipeline and ours."""
    from sana_jax.convert import export
    export.save_pipeline(directory, transformer=nnx.merge(self._dit_graph, self._dit_state), vae=self.vae,
                         text_encoder=self.text_encoder, tokenizer=self.tokenizer, flow_shift=self.flow_shift,
                         scheduler=next(name for name, s in SCHEDULERS.items() if s == self.sampler), dtype=dtype,
                         settings=self._non_default_settings(), **kwargs)

  def _non_default_settings(self):
    defaults = dict(max_sequence_length=300, complex_human_instruction=tuple(COMPLEX_HUMAN_INSTRUCTION),
                    guidance_scale=DEFAULT_GUIDANCE_SCALE)
    ours = dict(self.text_settings, guidance_scale=self.guidance_scale)
    return {k: v for k, v in ours.items() if v != defaults[k]}

  def set_transformer_params(self, state):
    """Swaps in new DiT weights of the same architecture (training's periodic samples)."""
    state = jax.device_put(state, self._replicated) if self.mesh is not None else state
    self._dit_state = state

  def encode_prompt(self, prompt, negative_prompt="", do_classifier_free_guidance=True, num_images_per_prompt=1):
    """(embeds, mask, negative embeds, negative mask), each repeated per image of a prompt."""
    out = self.prompt_encoder.encode(prompt, negative_prompt, do_classifier_free_guidance)
    return tuple(None if a is None else jnp.repeat(a, num_images_per_prompt, axis=0) for a in out)

  def _generate_impl(self, state, latents, embeds, mask, neg_embeds, neg_mask, guidance, pag_scale=0.0,
                     pag_layers=(), *, sampler, steps, cfg, pag=False):
    schedule, step = SAMPLERS[sampler]
    sigmas, timesteps = (jnp.asarray(a) for a in schedule(steps, self.flow_shift))
    model = nnx.merge(self._dit_graph, state)
    # one model call on [negative; positive; positive (perturbed)], the batch order diffusers uses
    parts = ([neg_embeds] if cfg else []) + [embeds] + ([embeds] if pag else [])
    masks = ([neg_mask] if cfg else []) + [mask] + ([mask] if pag else [])
    text = model.encode_text(jnp.concatenate(parts), jnp.concatenate(masks))  # once per generation
    n = latents.shape[0]
    perturbed = None
    if pag:
      rows = jnp.arange(n * len(parts)) >= n * (len(parts) - 1)
      perturbed = (rows, jnp.zeros(model.config.num_layers, bool).at[jnp.asarray(pag_layers)].set(True))

    def velocity(x, t):
      xin = jnp.concatenate([x] * len(parts))
      v = model(xin.astype(model.dtype), jnp.full((xin.shape[0],), t), text=text, perturbed=perturbed)
      v = jnp.split(v.astype(jnp.float32), len(parts))
      v_text = v[1] if cfg else v[0]
      out = v[0] + guidance * (v_text - v[0]) if cfg else v_text
      return out + pag_scale * (v_text - v[-1]) if pag else out

    return denoise(velocity, latents, sigmas, timesteps, step)

  def __call__(self, prompt, negative_prompt="", height=None, width=None, num_inference_steps=20, guidance_scale=None,
               num_images_per_prompt=1, seed=None, latents=None, output_type="pil", sampler=None,
               use_resolution_binning=True, pag_scale=0.0, pag_applied_layers=(0,)):
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
    f = self.vae_scale_factor
    height = height or self.transformer.config.sample_size * f
    width = width or self.transformer.config.sample_size * f
    validate(height, width, num_inference_steps, guidance_scale, f)
    asked = (height, width)
    table = aspect_ratio.TABLE_FOR_SAMPLE_SIZE.get(self.transformer.config.sample_size)
    if use_resolution_binning and table:  # generate at the trained bin, resize back after decoding
      height, width = aspect_ratio.closest_bin(height, width, aspect_ratio.bins(table))
    sampler = sampler or self.sampler
    if sampler not in SAMPLERS:
      raise SanaError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    cfg = guidance_scale > 1.0
    embeds, mask, neg, neg_mask = self.encode_prompt(prompts, negative_prompt, cfg, num_images_per_prompt)
    n = len(prompts) * num_images_per_prompt
    shape = (n, height // f, width // f, self.transformer.config.in_channels)
    if latents is None:
      seed = np.random.SeedSequence().entropy % 2**31 if seed is None else seed
      latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    elif tuple(latents.shape) != shape:
      raise SanaError(f"latents of shape {tuple(latents.shape)}; expected {shape} (NHWC)")
    if not math.isfinite(pag_scale) or pag_scale < 0:
      raise SanaError(f"--pag {pag_scale}: perturbed-attention guidance scale must be finite and non-negative")
    layers = tuple(sorted(_layer_indices(pag_applied_layers, self.transformer.config.num_layers)))
    pag = pag_scale > 0 and bool(layers)
    latents = self._denoise(jnp.asarray(latents), embeds, mask, neg, neg_mask, guidance_scale, sampler,
                            num_inference_steps, cfg, pag, pag_scale, layers)
    if output_type == "latent":
      return SanaPipelineOutput(latents)
    images = aspect_ratio.resize_and_crop(self.decode(latents), *asked)
    images = np.asarray(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1))
    if output_type == "np":
      return SanaPipelineOutput(images)
    from PIL import Image
    return SanaPipelineOutput([Image.fromarray((im * 255).round().astype(np.uint8)) for im in images])

  def _denoise(self, latents, embeds, mask, neg, neg_mask, guidance_scale, sampler, steps, cfg, pag, pag_scale,
               pag_layers):
    args = (latents, embeds, mask, neg, neg_mask)
    run = lambda *a: self._generate(self._dit_state, *a, jnp.float32(guidance_scale), jnp.float32(pag_scale),
                                    pag_layers, sampler=sampler, steps=steps, cfg=cfg, pag=pag)
    n_dev = 1 if self.mesh is None else self.mesh.devices.size
    if n_dev > 1 and latents.shape[0] % n_dev == 0:  # else the batch does not split evenly: one device
      args = tuple(None if a is None else jax.device_put(a, parallel.batch_sharding(self.mesh, a.ndim)) for a in args)
      with parallel.use_mesh(self.mesh):
        return run(*args)
    return run(*args)

  def decode(self, latents):
    """Latents -> images in [-1, 1]; tiled when the image is larger than `tiled_decode_above` pixels."""
    latents = latents / self.vae.scaling_factor
    f = self.vae_scale_factor
    if max(latents.shape[1], latents.shape[2]) * f > self.tiled_decode_above:
      return self.vae.tiled_decode(latents.astype(self.vae.dtype))
    return self._decode(latents.astype(self.vae.dtype))


def _layer_indices(layers, num_layers):
  """PAG layers as indices, from ints or diffusers' names ("transformer_blocks.8")."""
  layers = [layers] if isinstance(layers, (int, str)) else list(layers)
  out = set()
  for layer in layers:
    index = int(str(layer).rsplit(".", 1)[-1]) if not isinstance(layer, int) else layer
    if not 0 <= index < num_layers:
      raise SanaError(f"PAG layer {layer!r} is not one of the model's {num_layers} blocks")
    out.add(index)
  return out


def validate(height, width, steps, guidance_scale, factor):
  """User errors in generation settings, each as a one-line SanaError."""
  for name, value in (("height", height), ("width", width)):
    if not isinstance(value, int) or value <= 0 or value % factor:
      raise SanaError(f"--{name} {value} is not a positive multiple of {factor} (the model's spatial factor)")
  if not isinstance(steps, int) or steps <= 0:
    raise SanaError(f"--steps {steps}: the number of inference steps must be a positive integer")
  if not math.isfinite(guidance_scale) or guidance_scale < 0:
    raise SanaError(f"--cfg {guidance_scale}: guidance scale must be finite and non-negative")
