"""SanaPipeline: prompts -> Gemma-2 embeddings -> one jitted denoising scan -> DC-AE decode -> images.

Mirrors diffusers' SanaPipeline: `SanaPipeline.from_pretrained(dir)` reads a diffusers-format Sana
directory (model_index.json with tokenizer, text_encoder, transformer, vae, scheduler).
Latents are NHWC.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sana_jax import aspect_ratio, parallel, registry
from sana_jax.convert import pipelines
from sana_jax.errors import SanaError
from sana_jax.sampling import SAMPLERS, denoise
from sana_jax.text import COMPLEX_HUMAN_INSTRUCTION, PromptEncoder

DEFAULT_GUIDANCE_SCALE = 4.5  # diffusers' and the reference's


@dataclasses.dataclass
class SanaPipelineOutput:
  images: object  # list of PIL images, or an array [B, H, W, 3] in [0, 1] ("np"), or latents ("latent")


def load_pipeline(path, dtype="float32", **kwargs):
  """The pipeline class model_index.json names (registry.PIPELINES), loaded from a diffusers-format
  directory or hub id."""
  path = pipelines.resolve_model(path)
  cls = registry.pipeline_class(pipelines.read_model_index(path)["_class_name"], f"{path}/model_index.json")
  return cls.from_pretrained(path, dtype, **kwargs)


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
    """Loads a diffusers-format Sana directory (or hub id); keyword arguments override its settings."""
    components = {**cls.components_from_pretrained(path, dtype), **kwargs}  # the caller's settings win
    default_sampler = components.pop("sampler")
    return cls(**components, sampler=sampler or default_sampler)

  @staticmethod
  def components_from_pretrained(path, dtype=jnp.float32, *, transformer=True):
    """The pipeline's parts from a diffusers-format directory (or hub id), as constructor keywords;
    transformer=False leaves the DiT out (training samples with the model being trained)."""
    return pipelines.load_components(path, dtype, transformer=transformer)

  def save_pretrained(self, directory, dtype="float32", **kwargs):
    """Writes the pipeline in diffusers' format (model_index.json + components), loadable by diffusers'
    SanaPipeline and ours."""
    pipelines.save_pipeline(directory, transformer=nnx.merge(self._dit_graph, self._dit_state), vae=self.vae,
                            text_encoder=self.text_encoder, tokenizer=self.tokenizer, flow_shift=self.flow_shift,
                            scheduler=registry.scheduler_for(self.sampler), dtype=dtype,
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
    height = self.transformer.config.sample_size * f if height is None else height
    width = self.transformer.config.sample_size * f if width is None else width
    validate(height, width, num_inference_steps, guidance_scale, f, num_images_per_prompt)
    if output_type not in ("pil", "np", "latent"):
      raise SanaError(f"output_type {output_type!r}; expected 'pil', 'np' or 'latent'")
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
      latents = jax.random.normal(prng_key(seed), shape, jnp.float32)
    elif tuple(latents.shape) != shape:
      raise SanaError(f"latents of shape {tuple(latents.shape)}; expected {shape} (NHWC)")
    if not _is_number(pag_scale) or not math.isfinite(pag_scale) or pag_scale < 0:
      raise SanaError(f"pag_scale {pag_scale!r}: perturbed-attention guidance scale must be finite and non-negative")
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
    tail = str(layer).rsplit(".", 1)[-1]
    index = layer if isinstance(layer, int) else int(tail) if tail.isdigit() else -1
    if not 0 <= index < num_layers:
      raise SanaError(f"pag_applied_layers: {layer!r} is not one of the model's {num_layers} blocks")
    out.add(index)
  return out


MAX_SIZE = 16384           # pixels per side (the released models' largest bins are 4096)
MAX_STEPS = 1000           # the models' training timesteps
MAX_IMAGES_PER_PROMPT = 1024


def _is_number(value):
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def validate(height, width, steps, guidance_scale, factor, num_images_per_prompt=1):
  """User errors in generation settings, each as a one-line SanaError in the API's words."""
  for name, value in (("height", height), ("width", width)):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIZE or value % factor:
      raise SanaError(f"{name} {value!r} is not a positive multiple of {factor} (the model's spatial factor) "
                      f"up to {MAX_SIZE}")
  if not isinstance(steps, int) or isinstance(steps, bool) or not 0 < steps <= MAX_STEPS:
    raise SanaError(f"num_inference_steps {steps!r}: expected an integer from 1 to {MAX_STEPS}")
  if not _is_number(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
    raise SanaError(f"guidance_scale {guidance_scale!r}: expected a finite, non-negative number")
  if (not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool)
      or not 0 < num_images_per_prompt <= MAX_IMAGES_PER_PROMPT):
    raise SanaError(f"num_images_per_prompt {num_images_per_prompt!r}: expected an integer from 1 to "
                    f"{MAX_IMAGES_PER_PROMPT}")


def prng_key(seed):
  """A PRNG key for any seed in [0, 2^64). jax.random.key alone wraps seeds of 2^32 and above around
  silently (2^32 gives the key of 0); those fold their high half in instead."""
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**64:
    raise SanaError(f"seed {seed!r}: expected an integer in [0, 2^64)")
  seed = int(seed)
  key = jax.random.key(seed & 0xFFFFFFFF)
  return key if seed < 2**32 else jax.random.fold_in(key, seed >> 32)
