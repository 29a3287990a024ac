"""Sana's pipelines: prompts -> Gemma-2 embeddings -> one jitted sampling scan -> DC-AE decode -> images.

`BasePipeline` is what every family member shares: diffusers-format loading and saving, prompt
encoding, sizes and aspect-ratio bins, the initial noise, image-to-image inputs, decoding and output.
`SanaPipeline` (diffusers' SanaPipeline / SanaPAGPipeline) adds the flow samplers with CFG and PAG;
`sana_jax.sprint.SanaSprintPipeline` the few-step sCM sampler. Latents are NHWC.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sana_jax import aspect_ratio, lora, parallel, quant, registry
from sana_jax.convert import diffusers_lora, pipelines
from sana_jax.errors import SanaError, short
from sana_jax.quant import calibrate
from sana_jax.sampling import SAMPLERS, denoise
from sana_jax.text import COMPLEX_HUMAN_INSTRUCTION, PromptEncoder

DEFAULT_GUIDANCE_SCALE = 4.5  # diffusers' and the reference's


class _PipelinesOwn:
  """complex_human_instruction left at this: the pipeline's own (the model directory's setting, else
  Sana's), where diffusers' encode_prompt would use none."""

  def __repr__(self):
    return "<the pipeline's own>"


PIPELINES_OWN = _PipelinesOwn()


@dataclasses.dataclass
class SanaPipelineOutput:
  images: object  # list of PIL images, or an array [B, H, W, 3] in [0, 1] ("np"), or latents ("latent")


def load_pipeline(path, dtype="float32", **kwargs):
  """The pipeline class model_index.json names (registry.PIPELINES), loaded from a diffusers-format
  directory or hub id."""
  path = pipelines.resolve_model(path)
  cls = registry.pipeline_class(pipelines.read_model_index(path)["_class_name"], f"{path}/model_index.json")
  return cls.from_pretrained(path, dtype, **kwargs)


class BasePipeline:
  _class_name = None   # the model_index.json `_class_name` it saves as (registry.PIPELINES)

  def __init__(self, tokenizer, text_encoder, transformer, vae, *, sampler, max_sequence_length=300,
               complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION, tiled_decode_above=2048,
               guidance_scale=DEFAULT_GUIDANCE_SCALE, parallelism="auto", devices=None):
    samplers = registry.PIPELINES[self._class_name].samplers
    if sampler not in samplers:
      raise SanaError(f"{type(self).__name__} runs {' / '.join(samplers)}, not {short(sampler)}: a directory with "
                      f"another scheduler is another pipeline (sana_jax.load_pipeline picks it)")
    self.tokenizer, self.text_encoder, self.transformer, self.vae = tokenizer, text_encoder, transformer, vae
    self.sampler = sampler
    self.guidance_scale = guidance_scale  # what __call__ uses when given none
    self.text_settings = dict(max_sequence_length=max_sequence_length,
                              complex_human_instruction=tuple(complex_human_instruction or ()))
    self._prompt_encoders = {}
    self.prompt_encoder = self._prompt_encoder(max_sequence_length, PIPELINES_OWN)
    self.vae_scale_factor = vae.config.spatial_compression
    self.tiled_decode_above = tiled_decode_above
    self._dit_graph, self._dit_state = nnx.split(transformer)
    # several devices: weights replicated on all; each call splits its batch rows (prompts, CFG halves) and/or
    # its image's latent rows over them, as parallel.sampling_plan chooses for `parallelism`
    self._devices = parallel.sampling_devices(devices)
    if parallelism not in parallel.PARALLELISMS:
      raise SanaError(f"parallelism={short(parallelism)}; expected one of {', '.join(parallel.PARALLELISMS)}")
    self._parallelism = parallelism
    self.mesh = parallel.make_mesh(data=-1, devices=self._devices) if len(self._devices) > 1 else None
    if self.mesh is not None:
      self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self._dit_state = parallel.put(self._dit_state, self._replicated)
    self._decode, self._encode = vae._pure("decode"), vae._pure("encode")
    self._adapters, self._adapter_weights, self._lora_enabled = {}, {}, True
    self._fused, self._unfused_state = (), None

  # ---- loading and saving ----------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, path, dtype=jnp.float32, **kwargs):
    """Loads a diffusers-format directory (or hub id) of this pipeline class; keyword arguments
    override its settings."""
    path = pipelines.resolve_model(path)
    name = pipelines.read_model_index(path)["_class_name"]
    if registry.pipeline_class(name, f"{path}/model_index.json") is not cls:
      raise SanaError(f"{path} holds a {name}: load it with sana_jax.load_pipeline")
    kwargs = {k: v for k, v in kwargs.items() if not (k == "sampler" and v is None)}
    return cls(**{**cls.components_from_pretrained(path, dtype), **kwargs})  # the caller's settings win

  @staticmethod
  def components_from_pretrained(path, dtype=jnp.float32, *, transformer=True):
    """The pipeline's parts from a diffusers-format directory (or hub id), as constructor keywords;
    transformer=False leaves the DiT out (training samples with the model being trained)."""
    return pipelines.load_components(path, dtype, transformer=transformer)

  def save_pretrained(self, directory, dtype="float32", **kwargs):
    """Writes the pipeline in diffusers' format (model_index.json + components), loadable by diffusers'
    pipeline of the same class and ours."""
    pipelines.save_pipeline(directory, transformer=nnx.merge(self._dit_graph, self._dit_state), vae=self.vae,
                            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                            scheduler=registry.scheduler_for(self.sampler), **self.scheduler_settings, dtype=dtype,
                            settings=self._non_default_settings(), pipeline_class=self._class_name, **kwargs)

  @property
  def scheduler_settings(self):
    """The settings its scheduler reads (registry.SCHEDULERS: flow_shift, sigma_data), from the
    attributes of the same names, as keywords of save_pipeline."""
    scheduler = registry.SCHEDULERS[registry.scheduler_for(self.sampler)]
    return {keyword: getattr(self, keyword) for keyword in scheduler.settings.values()}

  def _non_default_settings(self):
    defaults = dict(max_sequence_length=300, complex_human_instruction=tuple(COMPLEX_HUMAN_INSTRUCTION),
                    guidance_scale=DEFAULT_GUIDANCE_SCALE)
    ours = dict(self.text_settings, guidance_scale=self.guidance_scale)
    return {k: v for k, v in ours.items() if v != defaults[k]}

  def set_transformer_params(self, state):
    """Swaps in new DiT weights of the same architecture (training's periodic samples)."""
    state = parallel.put(state, self._replicated) if self.mesh is not None else state
    self._dit_state = state

  # ---- LoRA, under diffusers' names ---------------------------------------------------------------

  def load_lora_weights(self, pretrained_model_name_or_path, adapter_name=None, *, weight_name=None):
    """Loads a diffusers / peft LoRA file of the transformer (a directory or hub id holding
    pytorch_lora_weights.safetensors or `weight_name`, a .safetensors path, or a state dict of arrays)
    as adapter `adapter_name` (default "default_<n>"); as in diffusers, it becomes the one active
    adapter, at weight 1.0."""
    name = f"default_{len(self._adapters)}" if adapter_name is None else adapter_name
    if quant.mode_of(self.transformer) is not None:
      raise SanaError(f"LoRA on a {quant.mode_of(self.transformer)} transformer: load the LoRA (and fuse_lora) "
                      f"into the float model, then quantize")
    if not isinstance(name, str) or not name:
      raise SanaError(f"adapter_name {short(name)}: expected a non-empty string")
    if name in self._adapters:
      raise SanaError(f"adapter name {name!r} is already in use; pick another or delete_adapters({name!r}) first")
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _flat(self._dit_state).items()}
    adapter = diffusers_lora.read(pretrained_model_name_or_path, self.transformer.config, shapes,
                                  weight_name=weight_name)
    adapter = jax.tree.map(jnp.asarray, adapter)
    self._adapters[name] = adapter if self.mesh is None else parallel.put(adapter, self._replicated)
    self._adapter_weights = {name: 1.0}

  def load_loras(self, loras):
    """[(path, scale)] loaded as adapters lora0, lora1, ... and made the active set at those scales (what
    sample.py's --lora flags do)."""
    for i, (path, _) in enumerate(loras):
      self.load_lora_weights(path, adapter_name=f"lora{i}")
    if loras:
      self.set_adapters([f"lora{i}" for i in range(len(loras))], [scale for _, scale in loras])

  def set_adapters(self, adapter_names, adapter_weights=None):
    """The adapters to apply and their weights (a number for all, or one per name; default 1.0).
    Changing weights does not recompile: they enter the jitted sampler as arrays."""
    names = self._adapter_names(adapter_names)
    if self._fused:
      raise SanaError("LoRA is fused into the weights; unfuse_lora() before set_adapters")
    weights = [1.0] * len(names) if adapter_weights is None else adapter_weights
    weights = [weights] * len(names) if _is_number(weights) else list(weights) if isinstance(weights, (list, tuple)) \
        else None
    if weights is None or len(weights) != len(names) or not all(_is_number(w) and math.isfinite(w) for w in weights):
      raise SanaError(f"adapter_weights {short(adapter_weights)}: expected a finite number or one per adapter "
                      f"({len(names)})")
    self._adapter_weights = {n: float(w) for n, w in zip(names, weights)}

  def get_active_adapters(self):
    return list(self._adapter_weights) if self._lora_enabled else []

  def get_list_adapters(self):
    return {"transformer": list(self._adapters)}

  def delete_adapters(self, adapter_names):
    names = self._adapter_names(adapter_names)
    if set(names) & set(self._fused):
      raise SanaError(f"adapter(s) {sorted(set(names) & set(self._fused))} are fused; unfuse_lora() first")
    for name in names:
      del self._adapters[name]
      self._adapter_weights.pop(name, None)

  def disable_lora(self):
    self._lora_enabled = False

  def enable_lora(self):
    self._lora_enabled = True

  def fuse_lora(self, lora_scale=1.0, adapter_names=None, safe_fusing=False):
    """Adds the active adapters (or `adapter_names`), times their weights and `lora_scale`, into the
    DiT's weights; unfuse_lora() restores the weights as they were, bit for bit."""
    if self._fused:
      raise SanaError("LoRA is already fused; unfuse_lora() first")
    if not _is_number(lora_scale) or not math.isfinite(lora_scale):
      raise SanaError(f"lora_scale {short(lora_scale)}: expected a finite number")
    names = self.get_active_adapters() if adapter_names is None else self._adapter_names(adapter_names)
    weighted = [(self._adapters[n], jnp.float32(self._adapter_weights.get(n, 1.0) * lora_scale)) for n in names]
    fused = nnx.state(nnx.merge(self._dit_graph, jax.jit(lora.apply)(self._dit_state, weighted)))
    if safe_fusing and not all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(fused)):
      raise SanaError("fusing the LoRA gives NaN or infinite weights; the weights are left unfused")
    self._unfused_state, self._dit_state, self._fused = self._dit_state, fused, tuple(names)

  def unfuse_lora(self):
    if self._fused:
      self._dit_state, self._unfused_state, self._fused = self._unfused_state, None, ()

  def unload_lora_weights(self):
    """Forgets every adapter. Fused weights stay (fuse_lora then unload_lora_weights keeps a LoRA
    baked in, as in diffusers)."""
    self._adapters, self._adapter_weights, self._fused, self._unfused_state = {}, {}, (), None

  def _adapter_names(self, adapter_names):
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
      raise SanaError(f"adapter names {short(adapter_names)}: expected a name or a list of names")
    unknown = [n for n in names if n not in self._adapters]
    if unknown:
      raise SanaError(f"no adapter named {short(unknown[0])}; loaded: {sorted(self._adapters)}")
    return list(names)

  def _dit_inputs(self):
    """The jitted samplers' DiT argument: (state, ((adapter, weight array), ...)) for the active,
    unfused adapters."""
    active = [n for n in self.get_active_adapters() if n not in self._fused]
    return self._dit_state, tuple((self._adapters[n], jnp.float32(self._adapter_weights[n])) for n in active)

  def _dit_model(self, inputs):
    state, weighted = inputs
    return nnx.merge(self._dit_graph, lora.apply(state, weighted))

  # ---- quantization ----------------------------------------------------------------------------

  def quantize(self, mode, calibration_prompts=None, num_inference_steps=20, *, guidance_scale=None, height=None,
               width=None, seed=0):
    """Quantizes the transformer for inference (sana_jax.quant): "int8" (W8A8), "fp8" (e4m3) or "w4a4"
    (SVDQuant). int8 and fp8 scale activations per token at every call and need no calibration. w4a4's
    smoothing comes from the largest activations of each layer's input channels over calibration runs:
    each prompt of `calibration_prompts` (default: quant.CALIBRATION_PROMPTS) is sampled by the float
    model in `num_inference_steps` steps (seed `seed` + its index), and the DiT is observed at every step's
    noise level on the path between that image's latents and its noise. save_pretrained then writes the
    quantized transformer; from_pretrained loads it without calibrating again."""
    quant.check_backend(mode)
    if self._adapters:
      raise SanaError("quantize with LoRA adapters loaded: fuse_lora() and unload_lora_weights() first (a fused "
                      "LoRA is quantized with the weights)")
    model = nnx.merge(self._dit_graph, self._dit_state)
    statistics = None
    if mode == "w4a4" and quant.mode_of(model) is None:
      statistics = self._calibration_statistics(model, calibration_prompts or quant.CALIBRATION_PROMPTS,
                                                num_inference_steps, guidance_scale, height, width, seed)
    self.transformer = quant.quantize_transformer(model, mode, statistics)
    self._dit_graph, state = nnx.split(self.transformer)
    self._dit_state = state if self.mesh is None else parallel.put(state, self._replicated)
    return self

  def _calibration_statistics(self, model, prompts, steps, guidance_scale, height, width, seed):
    raise SanaError(f"w4a4 calibration samples with Flow-DPM-Solver / Flow-Euler; {type(self).__name__} has neither: "
                    f"quantize its transformer in a SanaPipeline, save it, and load it here, or use int8 / fp8")

  # ---- prompts ---------------------------------------------------------------------------------

  def _prompt_encoder(self, max_sequence_length, complex_human_instruction):
    """A PromptEncoder per (length, instruction), kept: each holds its own compiled text encoder."""
    if complex_human_instruction is PIPELINES_OWN:
      complex_human_instruction = self.text_settings["complex_human_instruction"]
    elif complex_human_instruction:
      complex_human_instruction = pipelines.SETTINGS["complex_human_instruction"](
          complex_human_instruction, "complex_human_instruction")
    key = (max_sequence_length, tuple(complex_human_instruction or ()))
    if key not in self._prompt_encoders:
      self._prompt_encoders[key] = PromptEncoder(self.tokenizer, self.text_encoder, max_sequence_length=key[0],
                                                 complex_human_instruction=key[1])
    return self._prompt_encoders[key]

  def encode_prompt(self, prompt, do_classifier_free_guidance=True, negative_prompt="", num_images_per_prompt=1,
                    prompt_embeds=None, negative_prompt_embeds=None, prompt_attention_mask=None,
                    negative_prompt_attention_mask=None, clean_caption=False, max_sequence_length=None,
                    complex_human_instruction=PIPELINES_OWN):
    """(embeds, mask, negative embeds, negative mask), each repeated per image of a prompt; the
    negatives are None without guidance. diffusers' arguments and order. Differences: without
    max_sequence_length / complex_human_instruction the pipeline's own are used (the model
    directory's, else Sana's 300 tokens and instruction), where diffusers' encode_prompt uses 300 and
    no instruction; pass complex_human_instruction=None for none. Embeddings given are used as they are."""
    if clean_caption:
      raise SanaError("clean_caption=True is not implemented (it needs ftfy and BeautifulSoup, and the released "
                      "models are sampled without it); pass clean_caption=False")
    length = self.text_settings["max_sequence_length"] if max_sequence_length is None else max_sequence_length
    encoder = self._prompt_encoder(length, complex_human_instruction)
    if prompt_embeds is None:
      prompts = _prompt_list(prompt)
      if negative_prompt_embeds is None:
        out = encoder.encode(prompts, negative_prompt, do_classifier_free_guidance)
        return tuple(None if a is None else jnp.repeat(a, num_images_per_prompt, axis=0) for a in out)
      embeds, mask = encoder.encode_positive(prompts)
    else:
      embeds, mask = self._given_embeds(prompt_embeds, prompt_attention_mask, "prompt")
    neg = neg_mask = None
    if do_classifier_free_guidance:
      if negative_prompt_embeds is None:
        negatives = [negative_prompt] * len(embeds) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(embeds):
          raise SanaError(f"{len(negatives)} negative prompts for {len(embeds)} prompts")
        neg, neg_mask = encoder.encode_negative(_prompt_list(negatives, "negative_prompt"))
      else:
        neg, neg_mask = self._given_embeds(negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt")
        if neg.shape[0] != embeds.shape[0]:
          raise SanaError(f"negative_prompt_embeds for {neg.shape[0]} prompts, prompt_embeds for {embeds.shape[0]}")
    return tuple(None if a is None else jnp.repeat(a, num_images_per_prompt, axis=0)
                 for a in (embeds, mask, neg, neg_mask))

  def _given_embeds(self, embeds, mask, name):
    """Caller-made embeddings [B, L, caption_channels] and their mask [B, L], checked."""
    width = self.transformer.config.caption_channels
    embeds = np.asarray(embeds, np.float32)
    if embeds.ndim != 3 or embeds.shape[0] < 1 or embeds.shape[2] != width or not 0 < embeds.shape[1] <= 4096:
      raise SanaError(f"{name}_embeds of shape {embeds.shape}; expected [batch, tokens, {width}]")
    if mask is None:
      raise SanaError(f"{name}_embeds given without {name}_attention_mask [batch, tokens]")
    mask = np.asarray(mask)
    if mask.shape != embeds.shape[:2] or not np.isin(mask, (0, 1)).all():
      raise SanaError(f"{name}_attention_mask of shape {mask.shape}; expected 0/1 values of shape {embeds.shape[:2]}")
    if not np.isfinite(embeds).all():
      raise SanaError(f"{name}_embeds holds NaN or infinite values")
    return jnp.asarray(embeds), jnp.asarray(mask.astype(np.int32))

  # ---- sizes, noise, images --------------------------------------------------------------------

  def _sizes(self, height, width, use_resolution_binning):
    """(the size asked for, the size generated at): the trained aspect-ratio bin nearest the asked
    size when binning, the image resized back after decoding."""
    f = self.vae_scale_factor
    native = self.transformer.config.sample_size * f
    height, width = native if height is None else height, native if width is None else width
    check_size(height, width, f)
    table = aspect_ratio.TABLE_FOR_SAMPLE_SIZE.get(self.transformer.config.sample_size)
    if use_resolution_binning and table:
      return (height, width), aspect_ratio.closest_bin(height, width, aspect_ratio.bins(table))
    return (height, width), (height, width)

  def _noise(self, n, size, key, latents):
    """Standard-normal latents [n, h, w, C]: the caller's, checked, or drawn from PRNG `key`."""
    f = self.vae_scale_factor
    shape = (n, size[0] // f, size[1] // f, self.transformer.config.in_channels)
    if latents is None:
      return jax.random.normal(key, shape, jnp.float32)
    if tuple(latents.shape) != shape:
      raise SanaError(f"latents of shape {tuple(latents.shape)}; expected {shape} (NHWC)")
    return jnp.asarray(latents, jnp.float32)

  def _image_pixels(self, image, n, size):
    """image= (see image_batch) -> [n, height, width, 3] in [-1, 1] at the generated size: one image
    for all, one per prompt, or one per generated image."""
    pixels = image_batch(image, *size)
    if n % len(pixels):
      raise SanaError(f"{len(pixels)} images for {n} generated images; give 1, one per prompt or one per image")
    return jnp.repeat(jnp.asarray(pixels), n // len(pixels), axis=0) * 2 - 1

  def _image_latents(self, pixels):
    """Pixels in [-1, 1] -> DC-AE latents, scaled by the autoencoder's scaling factor."""
    if max(pixels.shape[1:3]) > self.tiled_decode_above:
      latents = self.vae.tiled_encode(pixels.astype(self.vae.dtype))
    else:
      latents = self._encode(pixels.astype(self.vae.dtype))
    return latents.astype(jnp.float32) * self.vae.scaling_factor

  # ---- running and output ----------------------------------------------------------------------

  @property
  def parallelism(self):
    """How calls use several devices (parallel.PARALLELISMS); fixed at construction, as compiled programs
    are kept per input shape."""
    return self._parallelism

  def sampling_plan(self, latents_shape, groups=1):
    """(batch ways, sequence ways) of a call on latents [n, h, w, C] whose model batch holds `groups` copies
    of the n images (2 with CFG, 3 with CFG and PAG): parallel.sampling_plan for this pipeline's devices."""
    n, h, w, _ = latents_shape
    p = self.transformer.config.patch_size
    return parallel.sampling_plan(self._parallelism, len(self._devices), rows=n * groups, groups=groups,
                                  token_rows=h // p, tokens=(h // p) * (w // p))

  def _on_devices(self, run, *args, groups=1):
    """run(*args) on the devices of the call's sampling plan: axis 0 of every array holds the images; the
    model's activations are split as the plan says (inputs only over the batch: rows are split in the DiT)."""
    ways = self.sampling_plan(args[0].shape, groups)
    if ways == (1, 1):
      return run(*args)
    mesh = parallel.make_mesh(data=ways[0], fsdp=ways[1], devices=self._devices)
    rules = parallel.SAMPLING_RULES
    place = lambda a: parallel.put(a, jax.sharding.NamedSharding(
        mesh, parallel.logical_to_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, mesh, rules)))
    args = tuple(None if a is None else place(a) for a in args)
    with parallel.use_mesh(mesh, rules):
      return parallel.fetch(run(*args))  # across processes: every one gets the whole result

  def decode(self, latents):
    """Latents -> images in [-1, 1]. On several devices, a large image (more than `tiled_decode_above`
    pixels a side, or split over devices while sampling) is decoded whole with its rows split over them;
    on one device, tiled above `tiled_decode_above`."""
    latents = latents / self.vae.scaling_factor
    f = self.vae_scale_factor
    large = max(latents.shape[1], latents.shape[2]) * f > self.tiled_decode_above
    split = self._parallelism in ("sequence", "cfg") or latents.shape[1] * latents.shape[2] >= parallel.SEQUENCE_ABOVE
    if self.mesh is not None and latents.shape[1] % len(self._devices) == 0 and (large or split):
      return parallel.fetch(self.vae.sharded_decode(latents.astype(self.vae.dtype), self.mesh))
    if large:
      return self.vae.tiled_decode(latents.astype(self.vae.dtype))
    return self._decode(latents.astype(self.vae.dtype))

  def _output(self, latents, asked, output_type, return_dict):
    if output_type == "latent":
      images = latents
    else:
      images = aspect_ratio.resize_and_crop(self.decode(latents), *asked)
      images = np.asarray(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1))
      if output_type == "pil":
        from PIL import Image
        images = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
    return SanaPipelineOutput(images) if return_dict else (images,)


class SanaPipeline(BasePipeline):
  """diffusers' SanaPipeline (and SanaPAGPipeline: PAG is a call argument): Flow-DPM-Solver or
  Flow-Euler with classifier-free and perturbed-attention guidance, text-to-image and image-to-image."""
  _class_name = "SanaPipeline"

  def __init__(self, tokenizer, text_encoder, transformer, vae, *, sampler="flow_dpm", flow_shift=3.0, **settings):
    super().__init__(tokenizer, text_encoder, transformer, vae, sampler=sampler, **settings)
    self.flow_shift = flow_shift
    self._generate = jax.jit(self._generate_impl,
                             static_argnames=("sampler", "steps", "start", "cfg", "pag", "pag_layers"))

  def _calibration_statistics(self, model, prompts, steps, guidance_scale, height, width, seed, batch_size=8):
    prompts = _prompt_list(prompts, "calibration_prompts")
    guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
    _, size = self._sizes(height, width, True)
    sigmas, timesteps = SAMPLERS[self.sampler][0](steps, self.flow_shift)
    ranges = calibrate.Ranges(model)
    for start in range(0, len(prompts), batch_size):
      batch = prompts[start:start + batch_size]
      noise = jnp.concatenate([self._noise(1, size, prng_key(seed + start + i), None) for i in range(len(batch))])
      x0 = self(batch, height=size[0], width=size[1], num_inference_steps=steps, guidance_scale=guidance_scale,
                latents=noise, output_type="latent", use_resolution_binning=False).images
      embeds, mask, neg, neg_mask = self.encode_prompt(batch, guidance_scale > 1.0)
      text = embeds if neg is None else jnp.concatenate([neg, embeds])
      text_mask = mask if neg is None else jnp.concatenate([neg_mask, mask])
      for sigma, t in zip(sigmas[:-1], timesteps):
        x = jnp.concatenate([(1 - sigma) * x0 + sigma * noise] * (text.shape[0] // len(batch)))
        ranges.observe(x.astype(model.dtype), jnp.full((x.shape[0],), t), text, text_mask)
    return ranges.statistics()

  def _generate_impl(self, dit, latents, embeds, mask, neg_embeds, neg_mask, guidance, pag_scale=0.0,
                     pag_layers=(), control=None, *, sampler, steps, start, cfg, pag=False):
    """control: (ControlNet state, condition latents [n, h, w, C], conditioning scale) or None."""
    schedule, step = SAMPLERS[sampler]
    sigmas, timesteps = (jnp.asarray(a) for a in schedule(steps, self.flow_shift))
    model = self._dit_model(dit)
    # one model call on [negative; positive; positive (perturbed)], the batch order diffusers uses
    parts = ([neg_embeds] if cfg else []) + [embeds] + ([embeds] if pag else [])
    masks = ([neg_mask] if cfg else []) + [mask] + ([mask] if pag else [])
    text = model.encode_text(jnp.concatenate(parts), jnp.concatenate(masks))  # once per generation
    n = latents.shape[0]
    perturbed = None
    if pag:
      rows = jnp.arange(n * len(parts)) >= n * (len(parts) - 1)
      perturbed = (rows, jnp.zeros(model.config.num_layers, bool).at[jnp.asarray(pag_layers)].set(True))

    if control is not None:  # the ControlNet's text and condition, once per generation, batched like the model's
      controlnet = nnx.merge(self._controlnet_graph, control[0])
      control_text = controlnet.encode_text(jnp.concatenate(parts), jnp.concatenate(masks))
      condition = jnp.concatenate([control[1]] * len(parts)).astype(controlnet.dtype)

    def velocity(x, t):
      xin = jnp.concatenate([x] * len(parts))
      tt = jnp.full((xin.shape[0],), t)
      residuals = None
      if control is not None:
        residuals = controlnet(xin.astype(controlnet.dtype), tt, controlnet_cond=condition,
                               conditioning_scale=control[2], text=control_text).astype(model.dtype)
      v = model(xin.astype(model.dtype), tt, text=text, perturbed=perturbed, controlnet_block_samples=residuals)
      v = jnp.split(v.astype(jnp.float32), len(parts))
      v_text = v[1] if cfg else v[0]
      out = v[0] + guidance * (v_text - v[0]) if cfg else v_text
      return out + pag_scale * (v_text - v[-1]) if pag else out

    return denoise(velocity, latents, sigmas, timesteps, step, start)

  def __call__(self, prompt=None, negative_prompt="", height=None, width=None, num_inference_steps=20,
               guidance_scale=None, num_images_per_prompt=1, seed=None, latents=None, output_type="pil", sampler=None,
               use_resolution_binning=True, pag_scale=0.0, pag_applied_layers=(0,), *, image=None, strength=1.0,
               prompt_embeds=None, prompt_attention_mask=None, negative_prompt_embeds=None,
               negative_prompt_attention_mask=None, max_sequence_length=None,
               complex_human_instruction=PIPELINES_OWN, clean_caption=False, return_dict=True, control_image=None,
               controlnet_conditioning_scale=1.0):
    """Images for `prompt` (or prompt_embeds), as diffusers' SanaPipeline makes them from the same
    latents (standard normal, NHWC; else drawn from `seed`). control_image / controlnet_conditioning_scale:
    SanaControlNetPipeline's.

    Image-to-image (`image`: PIL image(s) or an array [B, H, W, 3] in [0, 1]; other sizes are scaled
    to cover and centre-cropped): the run starts at the first step of the same schedule whose noise
    level sigma is at most `strength` (so the start is as fine as the schedule: a strength below its
    smallest sigma is an error), from x = (1 - sigma) * image latents + sigma * latents. strength
    1.0 starts at the first step, from the noise alone: text-to-image exactly. diffusers has no
    image-to-image pipeline for Sana.
    """
    guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
    check_generation(num_inference_steps, guidance_scale, num_images_per_prompt, output_type)
    asked, size = self._sizes(height, width, use_resolution_binning)
    sampler = sampler or self.sampler
    if sampler not in SAMPLERS:
      raise SanaError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    if not _is_number(pag_scale) or not math.isfinite(pag_scale) or pag_scale < 0:
      raise SanaError(f"pag_scale {pag_scale!r}: perturbed-attention guidance scale must be finite and non-negative")
    layers = tuple(sorted(_layer_indices(pag_applied_layers, self.transformer.config.num_layers)))
    pag = pag_scale > 0 and bool(layers)
    cfg = guidance_scale > 1.0
    embeds, mask, neg, neg_mask = self.encode_prompt(
        prompt, cfg, negative_prompt, num_images_per_prompt, prompt_embeds, negative_prompt_embeds,
        prompt_attention_mask, negative_prompt_attention_mask, clean_caption, max_sequence_length,
        complex_human_instruction)
    x = self._noise(embeds.shape[0], size, prng_key(seed), latents)
    start = 0
    if image is not None:
      check_strength(strength)
      pixels = self._image_pixels(image, x.shape[0], size)
      sigmas, _ = SAMPLERS[sampler][0](num_inference_steps, self.flow_shift)
      start = flow_start(sigmas, strength)
      if start > 0:  # at the first step, the noise alone (text-to-image)
        x = (1 - sigmas[start]) * self._image_latents(pixels) + sigmas[start] * x
    control = self._control(control_image, controlnet_conditioning_scale, x.shape[0], size)
    run = lambda *a: self._generate(self._dit_inputs(), *a, jnp.float32(guidance_scale), jnp.float32(pag_scale), layers,
                                    control, sampler=sampler, steps=num_inference_steps, start=start, cfg=cfg, pag=pag)
    x = self._on_devices(run, x, embeds, mask, neg, neg_mask, groups=1 + cfg + pag)
    return self._output(x, asked, output_type, return_dict)

  def _control(self, control_image, scale, n, size):
    if control_image is not None:
      raise SanaError("control_image needs a ControlNet: load a SanaControlNetPipeline directory")


class SanaControlNetPipeline(SanaPipeline):
  """diffusers' SanaControlNetPipeline: SanaPipeline with a SanaControlNetModel whose residuals steer the
  transformer. The control image is encoded by the VAE once per generation; ControlNet and transformer
  run in the same jitted scan, on the same classifier-free-guidance batch."""
  _class_name = "SanaControlNetPipeline"

  def __init__(self, tokenizer, text_encoder, transformer, vae, controlnet, **settings):
    super().__init__(tokenizer, text_encoder, transformer, vae, **settings)
    if controlnet.config.inner_dim != transformer.config.inner_dim:
      raise SanaError(f"a ControlNet of width {controlnet.config.inner_dim} for a transformer of width "
                      f"{transformer.config.inner_dim}")
    self.controlnet = controlnet
    self._controlnet_graph, self._controlnet_state = nnx.split(controlnet)
    if self.mesh is not None:
      self._controlnet_state = parallel.put(self._controlnet_state, self._replicated)

  @staticmethod
  def components_from_pretrained(path, dtype=jnp.float32, *, transformer=True):
    from sana_jax.models.controlnet import SanaControlNetModel
    parts = pipelines.load_components(path, dtype, transformer=transformer)
    controlnet_dir = pipelines.component_dir(pipelines.resolve_model(path), "controlnet")
    return dict(parts, controlnet=SanaControlNetModel.from_pretrained(controlnet_dir, dtype=dtype))

  def save_pretrained(self, directory, dtype="float32", **kwargs):
    super().save_pretrained(directory, dtype, controlnet=nnx.merge(self._controlnet_graph, self._controlnet_state),
                            **kwargs)

  def __call__(self, prompt=None, *args, control_image=None, controlnet_conditioning_scale=1.0, **kwargs):
    """SanaPipeline's call with diffusers' `control_image` (PIL image(s) or an array [B, H, W, 3] in
    [0, 1]; scaled to cover the generated size and centre-cropped, where diffusers resizes) and
    `controlnet_conditioning_scale` (the residuals' factor; 0 gives the transformer's own images)."""
    if control_image is None:
      raise SanaError("a SanaControlNetPipeline needs control_image")
    return super().__call__(prompt, *args, control_image=control_image,
                            controlnet_conditioning_scale=controlnet_conditioning_scale, **kwargs)

  def _control(self, control_image, scale, n, size):
    if not _is_number(scale) or not math.isfinite(scale):
      raise SanaError(f"controlnet_conditioning_scale {scale!r} must be a finite number")
    latents = self._image_latents(self._image_pixels(control_image, n, size))
    return self._controlnet_state, latents, jnp.float32(scale)


def flow_start(sigmas, strength):
  """Image-to-image's first step on a flow schedule (sigmas [steps + 1] ending at 0): the first
  whose sigma is at most `strength`."""
  below = np.flatnonzero(np.asarray(sigmas[:-1]) <= strength)
  if not below.size:
    raise SanaError(f"strength {strength}: below the smallest noise level of this {len(sigmas) - 1}-step schedule "
                    f"({float(sigmas[-2]):.3f}); raise strength or num_inference_steps")
  return int(below[0])


def image_batch(image, height, width):
  """The pipelines' `image`: a PIL image, a list of them, or an array [B, H, W, 3] / [H, W, 3] in
  [0, 1] -> float32 [B, height, width, 3] in [0, 1]. Images of another size are scaled (keeping their
  aspect) to cover it and centre-cropped, as training fits images into its aspect-ratio buckets."""
  from PIL import Image
  items = list(image) if isinstance(image, (list, tuple)) else [image]
  if not items:
    raise SanaError("image: an empty list")
  out = []
  for item in items:
    if isinstance(item, Image.Image):
      item = np.asarray(item.convert("RGB"), np.float32) / 255
    else:
      item = np.asarray(item, np.float32)
      if item.ndim == 4 and len(items) == 1:
        out.extend(_fit(x, height, width) for x in _checked_pixels(item))
        continue
      item = _checked_pixels(item[None])[0]
    out.append(_fit(item, height, width))
  return np.stack(out)


def _checked_pixels(batch):
  if batch.ndim != 4 or batch.shape[-1] != 3 or 0 in batch.shape or max(batch.shape[1:3]) > MAX_SIZE:
    raise SanaError(f"image of shape {batch.shape}; expected PIL images or an array [batch, height, width, 3] with "
                    f"sides up to {MAX_SIZE}")
  if not (np.isfinite(batch).all() and batch.min() >= 0 and batch.max() <= 1):
    raise SanaError("image: pixel values must lie in [0, 1]")
  return batch


def _fit(pixels, height, width):
  """[H, W, 3] in [0, 1] -> [height, width, 3]: as it is when the size matches, else cover + crop."""
  if pixels.shape[:2] == (height, width):
    return pixels
  from PIL import Image

  from sana_jax.data.images import resize_cover_crop
  as_image = Image.fromarray((pixels * 255).round().astype(np.uint8))
  return resize_cover_crop(as_image, height, width).astype(np.float32) / 255


def _prompt_list(prompt, name="prompt"):
  prompts = [prompt] if isinstance(prompt, str) else prompt
  if prompt is None or not isinstance(prompts, (list, tuple)) or not prompts:
    raise SanaError(f"{name}: expected a string or a non-empty list of strings (or {name}_embeds)")
  if not all(isinstance(p, str) for p in prompts):
    raise SanaError(f"{name}: every prompt must be a string")
  return list(prompts)


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
OUTPUT_TYPES = ("pil", "np", "latent")


def _flat(state):
  from flax import traverse_util
  return traverse_util.flatten_dict(nnx.to_pure_dict(state))


def _is_number(value):
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_int(value):
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_size(height, width, factor):
  for name, value in (("height", height), ("width", width)):
    if not _is_int(value) or not 0 < value <= MAX_SIZE or value % factor:
      raise SanaError(f"{name} {value!r} is not a positive multiple of {factor} (the model's spatial factor) "
                      f"up to {MAX_SIZE}")


def check_generation(steps, guidance_scale, num_images_per_prompt, output_type):
  """User errors in generation settings, each as a one-line SanaError in the API's words."""
  if not _is_int(steps) or not 0 < steps <= MAX_STEPS:
    raise SanaError(f"num_inference_steps {steps!r}: expected an integer from 1 to {MAX_STEPS}")
  if not _is_number(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
    raise SanaError(f"guidance_scale {guidance_scale!r}: expected a finite, non-negative number")
  if not _is_int(num_images_per_prompt) or not 0 < num_images_per_prompt <= MAX_IMAGES_PER_PROMPT:
    raise SanaError(f"num_images_per_prompt {num_images_per_prompt!r}: expected an integer from 1 to "
                    f"{MAX_IMAGES_PER_PROMPT}")
  if output_type not in OUTPUT_TYPES:
    raise SanaError(f"output_type {short(output_type)}; expected 'pil', 'np' or 'latent'")


def check_strength(strength):
  if not _is_number(strength) or not 0 < strength <= 1:
    raise SanaError(f"strength {strength!r}: expected a number in (0, 1]")


def prng_key(seed):
  """A PRNG key for any seed in [0, 2^64); None draws one. jax.random.key alone wraps seeds of 2^32
  and above around silently (2^32 gives the key of 0); those fold their high half in instead."""
  if seed is None:
    seed = np.random.SeedSequence().entropy % 2**31
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**64:
    raise SanaError(f"seed {seed!r}: expected an integer in [0, 2^64)")
  seed = int(seed)
  key = jax.random.key(seed & 0xFFFFFFFF)
  return key if seed < 2**32 else jax.random.fold_in(key, seed >> 32)
