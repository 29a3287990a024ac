"""Text to image (and image to image) with Sana and Sana-Sprint on the command line.

  python sample.py "a red fox in the snow" --model PATH_OR_HUB_ID [--steps 20 --cfg 4.5 --seed 0]
  python sample.py "a red fox in the snow" --model SPRINT_DIR          (2 steps; --steps 1 to 4)
  python sample.py "a red fox, oil painting" --image fox.jpg --strength 0.6
  python sample.py "a red fox" --model CONTROLNET_DIR --control-image edges.png [--control-scale 1.0]

Without --model, the demo model that ships inside the package. Any diffusers-format SanaPipeline,
SanaPAGPipeline, SanaControlNetPipeline, SanaSprintPipeline or SanaSprintImg2ImgPipeline directory works;
--steps defaults to the model's (2 for Sana-Sprint, else 20). Without --cfg, the model's own guidance scale
(model_index.json "sana_jax"; 3.0 for the demo model), else 4.5; for Sana-Sprint it is the embedded
guidance. --image starts from that image (scaled to cover the output size and centre-cropped); --strength
in (0, 1] is how much noise replaces it (default 0.6). A SanaControlNetPipeline needs --control-image (a
condition map such as an edge map, scaled to cover and centre-cropped like --image; --control-type edge
makes the edge map of an ordinary image, see sana_jax/controls.py) and takes --control-scale (the
ControlNet's residuals' factor, default 1.0; 0 gives the base model's image).
--lora PATH[:SCALE] (repeatable) applies a diffusers / peft LoRA file of the transformer (a directory with
pytorch_lora_weights.safetensors, or the file) at SCALE (default 1.0).
--quantize int8 | fp8 | w4a4 quantizes the transformer after loading (sana_jax.quant; LoRAs are fused into
the weights first); w4a4 first calibrates on --calibration-prompts FILE (one per line; default: a built-in
set). A directory saved quantized (SanaPipeline.quantize, then save_pretrained) loads quantized as it is.

Writes OUTPUT_DIR/NNNN.png in prompt order, each with its prompt, seed, steps, cfg, model (and LoRAs with
their scales) in the PNG's text metadata. Images already in OUTPUT_DIR are kept: numbering continues after
the highest NNNN.png there, unless --overwrite starts again at 0000.png. Each PNG appears whole or not at
all, also when the run is interrupted. Bad input ends with a one-line error and exit status 2.
"""
import json
import math
import os
import re
import sys
import time
import unicodedata

from sana_jax import files
from sana_jax.errors import ArgumentParser, SanaError, cli_main

MAX_SIZE = 4096          # the released models' largest aspect-ratio bins
MAX_STEPS = 1000         # the models' training timesteps
DEFAULT_STEPS, DEFAULT_STEPS_SPRINT = 20, 2
DEFAULT_STRENGTH = 0.6   # diffusers' SanaSprintImg2ImgPipeline
MAX_IMAGES = 100_000     # images per run
SEED_LIMIT = 2**64
IMAGE_NAME = re.compile(r"(\d{4,})\.png")


def parse_args(argv):
  p = ArgumentParser(prog="sample.py", description="Sana text-to-image sampling (JAX).")
  p.add_argument("prompts", nargs="*", help="prompt(s); or use --prompt / --prompt-file")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompt-file", help="UTF-8 text, one prompt per line; '-' reads standard input")
  p.add_argument("--negative-prompt", default="")
  p.add_argument("--model", help="a diffusers-format Sana directory or a hub id (default: the shipped demo model)")
  p.add_argument("--height", type=int)
  p.add_argument("--width", type=int)
  p.add_argument("--aspect", help="W:H, e.g. 16:9, at the model's native area (instead of --height/--width)")
  p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 2 for Sana-Sprint, else 20)")
  p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off; default: the "
                 "model's own, else 4.5)")
  p.add_argument("--image", help="image-to-image: start from this image file")
  p.add_argument("--strength", type=float, default=None, help="image-to-image noise strength in (0, 1] (default 0.6)")
  p.add_argument("--control-image", help="a SanaControlNetPipeline's condition image (e.g. an edge map)")
  p.add_argument("--control-type", default="image", choices=("image", "edge"),
                 help="image: --control-image is the condition map itself; edge: its edge map (sana_jax.controls)")
  p.add_argument("--control-scale", type=float, default=None, help="ControlNet conditioning scale (default 1.0)")
  p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                 help="a LoRA file or directory, at SCALE (default 1.0); repeatable")
  p.add_argument("--quantize", choices=("int8", "fp8", "w4a4"), help="quantize the transformer (default: as saved)")
  p.add_argument("--calibration-prompts", metavar="FILE", help="w4a4: calibrate on these prompts, one per line")
  p.add_argument("--pag", type=float, default=0.0, help="perturbed-attention guidance scale (0 = off)")
  p.add_argument("--pag-layers", default="0", help="comma-separated block indices for PAG (default: 0)")
  p.add_argument("--sampler", default=None, help="flow_dpm | flow_euler (default: the model's scheduler)")
  p.add_argument("--seed", type=int, default=0, help="image i uses seed + i; any integer in [0, 2^64)")
  p.add_argument("--batch-size", type=int, default=1, help="prompts per model call")
  p.add_argument("--num-images-per-prompt", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--output-dir", default="outputs")
  p.add_argument("--overwrite", action="store_true", help="number images from 0000.png, replacing those there")
  p.add_argument("--devices", type=int, default=None, help="local devices to sample on (default: all the run's)")
  p.add_argument("--parallelism", default="auto", choices=("auto", "batch", "cfg", "sequence"),
                 help="how the devices share a call: the batch rows, the CFG halves x image rows, or the image rows "
                      "(default auto: images of 2048 px and up are split by rows)")
  return p.parse_args(argv)


def gather_prompts(args):
  prompts = list(args.prompts) + list(args.prompt)
  if args.prompt_file:
    text = files.read_text(args.prompt_file, "--prompt-file")
    prompts += [line for line in text.splitlines() if line.strip()]
  if not prompts:
    raise SanaError('no prompt given: python sample.py "a prompt" (or --prompt / --prompt-file)')
  return prompts


def check_settings(args, configs, n_images):
  """Everything checkable before loading weights, from the model's validated configs."""
  from sana_jax.sampling import SAMPLERS
  sprint = configs["scheduler"]["sampler"] == "scm"
  if sprint:
    for flag, given in (("--sampler", args.sampler is not None), ("--pag", args.pag != 0),
                        ("--negative-prompt", bool(args.negative_prompt))):
      if given:
        raise SanaError(f"{flag}: a Sana-Sprint model samples with sCM steps and embedded guidance; it takes no {flag}")
  args.steps = (DEFAULT_STEPS_SPRINT if sprint else DEFAULT_STEPS) if args.steps is None else args.steps
  if args.strength is not None and not args.image:
    raise SanaError("--strength is for image-to-image: give --image too")
  if args.image:
    args.strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    if not 0 < args.strength <= 1:
      raise SanaError(f"--strength {args.strength}: expected a number in (0, 1]")
  if (args.control_scale is not None or args.control_type != "image") and not args.control_image:
    raise SanaError("--control-scale and --control-type are for a ControlNet: give --control-image too")
  controlnet = configs["index"]["_class_name"] == "SanaControlNetPipeline"
  if controlnet != bool(args.control_image):
    raise SanaError("this model is a ControlNet pipeline: give --control-image" if controlnet else
                    "--control-image is for a SanaControlNetPipeline model, and this is not one")
  args.control_scale = 1.0 if args.control_scale is None else args.control_scale
  if not math.isfinite(args.control_scale):
    raise SanaError(f"--control-scale {args.control_scale}: expected a finite number")
  if args.calibration_prompts and args.quantize != "w4a4":
    raise SanaError("--calibration-prompts is for --quantize w4a4 (int8 and fp8 need no calibration)")
  if not 0 < args.steps <= MAX_STEPS:
    raise SanaError(f"--steps {args.steps}: the number of inference steps must be from 1 to {MAX_STEPS}")
  if args.cfg is not None and (not math.isfinite(args.cfg) or args.cfg < 0):
    raise SanaError(f"--cfg {args.cfg}: guidance scale must be finite and non-negative")
  if not math.isfinite(args.pag) or args.pag < 0:
    raise SanaError(f"--pag {args.pag}: perturbed-attention guidance scale must be finite and non-negative")
  try:
    args.pag_layers = tuple(int(v) for v in args.pag_layers.split(","))
  except ValueError:
    raise SanaError(f"--pag-layers {args.pag_layers[:40]!r}: expected block indices such as 8 or 7,8") from None
  if args.sampler is not None and args.sampler not in SAMPLERS:
    raise SanaError(f"--sampler {args.sampler[:40]!r}: expected one of {', '.join(sorted(SAMPLERS))}")
  if args.devices is not None and args.devices < 1:
    raise SanaError(f"--devices {args.devices}: expected a positive number of local devices")
  for flag, value in (("--batch-size", args.batch_size), ("--num-images-per-prompt", args.num_images_per_prompt)):
    if not 0 < value <= MAX_IMAGES:
      raise SanaError(f"{flag} {value}: expected an integer from 1 to {MAX_IMAGES}")
  if n_images > MAX_IMAGES:
    raise SanaError(f"{n_images} images asked for; at most {MAX_IMAGES} per run")
  if not 0 <= args.seed or args.seed + n_images > SEED_LIMIT:
    raise SanaError(f"--seed {args.seed}: seeds (seed + image index) must lie in [0, 2^64)")
  dit, factor = configs["transformer"], configs["vae"].spatial_compression
  native = dit.sample_size * factor
  bad = [i for i in args.pag_layers if not 0 <= i < dit.num_layers]
  if args.pag and bad:
    raise SanaError(f"--pag-layers: PAG layer(s) {bad[:8]} not among the model's {dit.num_layers} blocks")
  if args.aspect:
    try:
      w, h = (float(v) for v in args.aspect.split(":"))
      ratio = w / h
    except (ValueError, ZeroDivisionError):
      raise SanaError(f"--aspect {args.aspect[:40]!r}: expected W:H such as 16:9") from None
    if not (math.isfinite(ratio) and 1 / 64 <= ratio <= 64 and w > 0):
      raise SanaError(f"--aspect {args.aspect[:40]!r}: width and height must be positive, at most 64:1 apart")
    args.height = max(factor, round(native / math.sqrt(ratio) / factor) * factor)
    args.width = max(factor, round(native * math.sqrt(ratio) / factor) * factor)
  args.height = native if args.height is None else args.height
  args.width = native if args.width is None else args.width
  for name in ("height", "width"):
    value = getattr(args, name)
    if value > MAX_SIZE:
      raise SanaError(f"--{name} {value} is beyond the largest supported size, {MAX_SIZE}")
    if value <= 0 or value % factor:
      raise SanaError(f"--{name} {value} is not a positive multiple of {factor} (the model's spatial factor); "
                      f"try {max(factor, value // factor * factor)} or {max(1, value // factor + 1) * factor}")


def first_index(output_dir, overwrite):
  """Where numbering starts: after the highest NNNN.png already in the directory, or 0 with --overwrite."""
  if overwrite:
    return 0
  taken = [int(m.group(1)) for name in os.listdir(output_dir) if (m := IMAGE_NAME.fullmatch(name))]
  return max(taken, default=-1) + 1


def metadata_text(value):
  """PNG text without control characters (a NUL would end a tEXt chunk; newlines are kept as spaces)."""
  return "".join(" " if unicodedata.category(c) == "Cc" else c for c in str(value))


def save_png(image, path, meta):
  from PIL.PngImagePlugin import PngInfo
  info = PngInfo()
  for key, value in meta.items():
    info.add_text(key, metadata_text(value))
  files.write_image(path, image, pnginfo=info)


def demo_model():
  """The shipped shapes model (sana_jax/assets/sana-shapes), found without importing JAX; None if absent."""
  path = os.path.join(os.path.dirname(os.path.abspath(files.__file__)), "assets", "sana-shapes")
  return path if os.path.exists(os.path.join(path, "model_index.json")) else None


@cli_main
def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  prompts = gather_prompts(args)
  if not args.model:
    args.model = demo_model()
    if args.model is None:
      raise SanaError("no --model given, and this install has no demo model (sana_jax/assets/sana-shapes)")
  from sana_jax.convert import pipelines
  model_dir = pipelines.resolve_model(args.model)
  check_settings(args, pipelines.check(model_dir), len(prompts) * args.num_images_per_prompt)
  jobs = [(p, i) for p in prompts for i in range(args.num_images_per_prompt)]
  from sana_jax.convert.diffusers_lora import parse_specs
  loras = parse_specs(args.lora)
  calibration = None
  if args.calibration_prompts:
    calibration = [line for line in files.read_text(args.calibration_prompts, "--calibration-prompts").splitlines()
                   if line.strip()]
    if not calibration:
      raise SanaError(f"--calibration-prompts {args.calibration_prompts}: no prompt in the file")
  files.output_directory(args.output_dir, "--output-dir", create=False)
  if args.image or args.control_image:  # sana_jax.data imports the data loader: only when an image is given
    from sana_jax.data import images as image_files
  init_image = None
  if args.image:
    init_image = image_files.load(args.image, "--image")
  control_image = None
  if args.control_image:
    control_image = image_files.load(args.control_image, "--control-image")
    if args.control_type == "edge":
      import numpy as np
      from PIL import Image

      from sana_jax.controls import edge_map
      edges = edge_map(np.asarray(control_image, np.float32) / 255)
      control_image = Image.fromarray((edges * 255).astype(np.uint8))

  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from sana_jax.training import distributed
  distributed.maybe_initialize()  # the processes of a TPU slice (or JAX_COORDINATOR_ADDRESS...) sample together
  from sana_jax.compile_cache import enable_compilation_cache
  from sana_jax.pipeline import load_pipeline, prng_key
  from sana_jax.sprint import SanaSprintPipeline, seeded_step_noise
  enable_compilation_cache()
  pipe = load_pipeline(model_dir, dtype=args.dtype, sampler=args.sampler, devices=args.devices,
                       parallelism=args.parallelism)
  sprint = isinstance(pipe, SanaSprintPipeline)
  pipe.load_loras(loras)
  if args.quantize:
    if loras:
      pipe.fuse_lora()
      pipe.unload_lora_weights()
    pipe.quantize(args.quantize, calibration_prompts=calibration, num_inference_steps=args.steps)
  files.output_directory(args.output_dir, "--output-dir")
  index = first_index(args.output_dir, args.overwrite)
  cfg = pipe.guidance_scale if args.cfg is None else args.cfg
  f = pipe.vae_scale_factor
  latent_shape = (args.height // f, args.width // f, pipe.transformer.config.in_channels)
  settings = dict(height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=cfg)
  if init_image is not None:
    settings.update(image=init_image, strength=args.strength)
  if control_image is not None:
    settings.update(control_image=control_image, controlnet_conditioning_scale=args.control_scale)
  if not sprint:
    settings.update(negative_prompt=args.negative_prompt, pag_scale=args.pag, pag_applied_layers=args.pag_layers)
  first_call, later, later_images, written = None, 0.0, 0, 0
  for start in tqdm(range(0, len(jobs), args.batch_size), desc="sampling", unit="batch"):
    batch = jobs[start:start + args.batch_size]
    seeds = [args.seed + start + k for k in range(len(batch))]
    # each image's noise comes from its own seed alone, whatever the batch size
    noise = dict(latents=jnp.stack([jax.random.normal(prng_key(s), latent_shape) for s in seeds]))
    if sprint:
      noise["step_noise"] = jnp.concatenate([seeded_step_noise(prng_key(s), args.steps, (1, *latent_shape))
                                             for s in seeds], axis=1)
    began = time.perf_counter()
    images = pipe([p for p, _ in batch], **settings, **noise).images
    elapsed = time.perf_counter() - began
    if first_call is None:
      first_call = elapsed
    else:
      later, later_images = later + elapsed, later_images + len(batch)
    for (prompt, _), seed, image in zip(batch, seeds, images):
      meta = dict(prompt=prompt, seed=seed, steps=args.steps, cfg=cfg, model=args.model,
                  sampler=args.sampler or pipe.sampler)
      if not sprint:
        meta["pag"] = args.pag
      if init_image is not None:
        meta.update(image=args.image, strength=args.strength)
      if control_image is not None:
        meta.update(control_image=args.control_image, control_type=args.control_type, control_scale=args.control_scale)
      if args.quantize:
        meta["quantize"] = args.quantize
      if loras:
        meta["lora"] = json.dumps([{"path": path, "scale": scale} for path, scale in loras])
      if jax.process_index() == 0:  # every process holds every image; one writes them
        save_png(image, os.path.join(args.output_dir, f"{index:04d}.png"), meta)
      index, written = index + 1, written + 1
  rate = later_images / later if later else len(jobs[:args.batch_size]) / first_call
  if jax.process_index() == 0:
    print(f"wrote {written} image(s) to {args.output_dir} (last {index - 1:04d}.png); first call (with compile) "
          f"{first_call:.1f} s; {rate:.2f} images/s{'' if later else ' (one batch, compile included)'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
