"""Text to image with Sana on the command line.

  python sample.py "a red fox in the snow" --model PATH_OR_HUB_ID [--steps 20 --cfg 4.5 --seed 0]

Without --cfg the model's own guidance scale is used (model_index.json "sana_jax", see
sana_jax.pipeline.model_settings; 3.0 for the shipped demo model), else 4.5.

Writes OUTPUT_DIR/0000.png, 0001.png, ... in prompt order, each with its prompt, seed, steps, cfg and
model in the PNG's text metadata. Bad input ends with a one-line error and exit status 2.
"""
import argparse
import json
import math
import os
import sys
import time


class UserError(Exception):
  pass


class Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit status 2 (argparse's default prints the usage too)
    raise UserError(message)


def parse_args(argv):
  p = Parser(description="Sana text-to-image sampling (JAX).")
  p.add_argument("prompts", nargs="*", help="prompt(s); or use --prompt / --prompt-file")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompt-file", help="a text file with one prompt per line")
  p.add_argument("--negative-prompt", default="")
  p.add_argument("--model", help="a diffusers-format Sana directory or a hub id (default: the shipped demo model)")
  p.add_argument("--height", type=int)
  p.add_argument("--width", type=int)
  p.add_argument("--aspect", help="W:H, e.g. 16:9, at the model's native area (instead of --height/--width)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off; default: the "
                 "model's own, else 4.5)")
  p.add_argument("--pag", type=float, default=0.0, help="perturbed-attention guidance scale (0 = off)")
  p.add_argument("--pag-layers", default="0", help="comma-separated block indices for PAG (default: 0)")
  p.add_argument("--sampler", default=None, help="flow_dpm | flow_euler (default: the model's scheduler)")
  p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
  p.add_argument("--batch-size", type=int, default=1, help="prompts per model call")
  p.add_argument("--num-images-per-prompt", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--output-dir", default="outputs")
  return p.parse_args(argv)


def gather_prompts(args):
  prompts = list(args.prompts) + list(args.prompt)
  if args.prompt_file:
    if not os.path.isfile(args.prompt_file):
      raise UserError(f"prompt file {args.prompt_file!r} does not exist")
    with open(args.prompt_file, encoding="utf-8") as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise UserError('no prompt given: python sample.py "a prompt" (or --prompt / --prompt-file)')
  return prompts


def check_settings(args, model_dir):
  """Everything checkable before loading weights, from the model's JSON configs."""
  from sana_jax.sampling import SAMPLERS
  if args.steps <= 0:
    raise UserError(f"--steps {args.steps}: the number of inference steps must be positive")
  if args.cfg is not None and (not math.isfinite(args.cfg) or args.cfg < 0):
    raise UserError(f"--cfg {args.cfg}: guidance scale must be finite and non-negative")
  if not math.isfinite(args.pag) or args.pag < 0:
    raise UserError(f"--pag {args.pag}: perturbed-attention guidance scale must be finite and non-negative")
  try:
    args.pag_layers = tuple(int(v) for v in args.pag_layers.split(","))
  except ValueError:
    raise UserError(f"--pag-layers {args.pag_layers!r}: expected block indices such as 8 or 7,8") from None
  if args.sampler is not None and args.sampler not in SAMPLERS:
    raise UserError(f"--sampler {args.sampler!r}: expected one of {', '.join(sorted(SAMPLERS))}")
  if args.batch_size <= 0 or args.num_images_per_prompt <= 0:
    raise UserError("--batch-size and --num-images-per-prompt must be positive")
  with open(os.path.join(model_dir, "vae", "config.json")) as f:
    factor = 2 ** (len(json.load(f)["encoder_block_out_channels"]) - 1)
  with open(os.path.join(model_dir, "transformer", "config.json")) as f:
    dit = json.load(f)
  native = dit.get("sample_size", 32) * factor
  bad = [i for i in args.pag_layers if not 0 <= i < dit.get("num_layers", 0)]
  if args.pag and bad:
    raise UserError(f"--pag-layers: PAG layer(s) {bad} not among the model's {dit.get('num_layers')} blocks")
  if args.aspect:
    try:
      w, h = (float(v) for v in args.aspect.split(":"))
      ratio = w / h
    except (ValueError, ZeroDivisionError):
      raise UserError(f"--aspect {args.aspect!r}: expected W:H such as 16:9") from None
    args.height = max(factor, round(native / math.sqrt(ratio) / factor) * factor)
    args.width = max(factor, round(native * math.sqrt(ratio) / factor) * factor)
  args.height, args.width = args.height or native, args.width or native
  for name in ("height", "width"):
    value = getattr(args, name)
    if value <= 0 or value % factor:
      raise UserError(f"--{name} {value} is not a positive multiple of {factor} (the model's spatial factor); "
                      f"try {max(factor, value // factor * factor)} or {(value // factor + 1) * factor}")
    if value > 4096:
      raise UserError(f"--{name} {value} is beyond the largest supported size, 4096")


def save_png(image, path, meta):
  """Writes next to the target and renames, so a failure never leaves a half-written PNG."""
  from PIL.PngImagePlugin import PngInfo
  info = PngInfo()
  for key, value in meta.items():
    info.add_text(key, str(value))
  tmp = path + ".part"
  image.save(tmp, format="PNG", pnginfo=info)
  os.replace(tmp, path)


def demo_model():
  """The shipped shapes model (sana_jax/assets/sana-shapes), found without importing JAX; None if absent."""
  import importlib.util
  spec = importlib.util.find_spec("sana_jax")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "assets", "sana-shapes")
  return path if os.path.exists(os.path.join(path, "model_index.json")) else None


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  prompts = gather_prompts(args)
  if not args.model:
    args.model = demo_model()
    if args.model is None:
      raise UserError("no --model given, and this install has no demo model (sana_jax/assets/sana-shapes)")
  from sana_jax.errors import SanaError
  from sana_jax.pipeline import resolve_model
  try:
    model_dir = resolve_model(args.model)
  except SanaError as e:
    raise UserError(str(e)) from None
  if not os.path.exists(os.path.join(model_dir, "model_index.json")):
    raise UserError(f"{args.model}: not a diffusers-format Sana directory (no model_index.json)")
  check_settings(args, model_dir)

  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from sana_jax import SanaPipeline
  from sana_jax.compile_cache import enable_compilation_cache
  enable_compilation_cache()
  pipe = SanaPipeline.from_pretrained(model_dir, dtype=args.dtype, sampler=args.sampler)
  cfg = pipe.guidance_scale if args.cfg is None else args.cfg
  jobs = [(p, i) for p in prompts for i in range(args.num_images_per_prompt)]
  os.makedirs(args.output_dir, exist_ok=True)
  f = pipe.vae_scale_factor
  first_call, later, later_images = None, 0.0, 0
  index = 0
  for start in tqdm(range(0, len(jobs), args.batch_size), desc="sampling", unit="batch"):
    batch = jobs[start:start + args.batch_size]
    seeds = [args.seed + start + k for k in range(len(batch))]
    latents = jnp.stack([jax.random.normal(jax.random.key(s), (args.height // f, args.width // f,
                                                                pipe.transformer.config.in_channels))
                         for s in seeds])
    began = time.perf_counter()
    images = pipe([p for p, _ in batch], negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_inference_steps=args.steps, guidance_scale=cfg, latents=latents, pag_scale=args.pag,
                  pag_applied_layers=args.pag_layers).images
    elapsed = time.perf_counter() - began
    if first_call is None:
      first_call = elapsed
    else:
      later, later_images = later + elapsed, later_images + len(batch)
    for (prompt, _), seed, image in zip(batch, seeds, images):
      save_png(image, os.path.join(args.output_dir, f"{index:04d}.png"),
               dict(prompt=prompt, seed=seed, steps=args.steps, cfg=cfg, pag=args.pag, model=args.model,
                    sampler=pipe.sampler if args.sampler is None else args.sampler))
      index += 1
  rate = later_images / later if later else len(jobs[:args.batch_size]) / first_call
  print(f"wrote {index} image(s) to {args.output_dir}; first call (with compile) {first_call:.1f} s; "
        f"{rate:.2f} images/s{'' if later else ' (one batch, compile included)'}")


if __name__ == "__main__":
  try:
    main()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    sys.exit(130)
  except Exception as e:  # noqa: BLE001 - SanaError from deeper down is still the user's to fix
    from sana_jax.errors import SanaError
    if isinstance(e, SanaError):
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    raise
