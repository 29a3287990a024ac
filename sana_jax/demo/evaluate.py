"""Prompt-image alignment for the shapes grammar (`shapes.py`), in the spirit of GenEval.

    python -m sana_jax.demo.evaluate --model DIR --n 200 --out DIR [--steps 20 --cfg CFG --seed 0]
    python -m sana_jax.demo.evaluate --reference --n 200 --out DIR   # ground-truth renders: the ceiling
    ... --triangle down   # prompted triangles must point down (an orientation LoRA; --reference draws them so)

writes DIR/report.json and DIR/grid.png (samples in prompt order, green frame = correct).

Detection: each pixel takes the nearest palette colour (white = background) when within `tol` (RGB
distance; the closest two palette colours are 116 apart); each colour's 8-connected components of at
least `min_area` pixels, holes filled, are objects. Shape from the bounding box: fill ratio >= 0.89
square; a triangle (fill ~0.5-0.58) has about a quarter of its pixels in the top half of its box (< 0.4)
when it points up, in the bottom half when it points down (its detection says which in "pointing"), a
circle (fill ~0.79) half; elongated boxes (aspect > 1.5) or other fills are no shape. Size word from
the extent on a 64 px canvas: "small" below 19 px, "large" from 19 px (the data draws 12-16 and 22-28).

Scoring, per prompt, all-or-nothing as in GenEval (the prompt scores 1 when every check passes):
  single    object: some detection has the colour and shape; size: one of those has the size word
  count     object, and count: exactly that many detections have the colour and shape
  relation  object: both present; relation: some pair of distinct detections satisfies
            `shapes.relation_holds` (the definition the data is generated with)
A prompted triangle is one pointing `triangle` ("up" unless told, as the data draws them); one pointing
the other way counts as no triangle. Extra objects are not penalized (as in GenEval). The report gives the
mean over prompts, per category, for seen vs held-out pairs, the pass rate of each check, and under
"triangles" how the prompted triangles point (`triangle_orientation`).
"""
import functools
import json
import os
import sys
import textwrap

import numpy as np

from sana_jax import files
from sana_jax.demo import shapes
from sana_jax.errors import ArgumentParser, SanaError, cli_main

TOL = 60.0
MIN_AREA = 10
SQUARE_FILL, CIRCLE_FILL, MIN_FILL = 0.89, 0.64, 0.3
TRIANGLE_TOP, MAX_ASPECT = 0.4, 1.5
LARGE_FROM = 19  # px on a 64 px canvas
CATEGORIES = ("single", "count", "relation")


def parse_prompt(prompt):
  """The prompt's `shapes.Spec`; SanaError when it is outside the grammar."""
  spec = shapes.parse(prompt) if isinstance(prompt, str) else None
  if spec is None:
    raise SanaError(f"prompt {prompt!r} is outside the shapes grammar: expected 'a [small|large] COLOUR SHAPE', "
                    "'two|three COLOUR SHAPEs' or 'a COLOUR SHAPE to the left of|to the right of|above|below "
                    f"a COLOUR SHAPE' (colours {', '.join(shapes.COLOURS)}; shapes {', '.join(shapes.SHAPES)})")
  return spec


# ---- detection


def label(mask):
  """(labels int32 [H, W], n): 8-connected components of a bool mask, numbered 1..n in raster order
  of their first pixel (as scipy.ndimage.label numbers them)."""
  try:
    from scipy import ndimage
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), int))
    return labels.astype(np.int32), int(n)
  except ImportError:
    return _label_numpy(mask)


def _label_numpy(mask):
  """Min-label propagation: each pixel takes the smallest raster index among its 8 neighbours until
  nothing changes (iterations ~ the longest component's diameter; fine at 64 px)."""
  h, w = mask.shape
  big = np.iinfo(np.int64).max
  ids = np.where(mask, np.arange(h * w).reshape(h, w), big)
  while True:
    p = np.pad(ids, 1, constant_values=big)
    nbr = np.min([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
    new = np.where(mask, np.minimum(ids, nbr), big)
    if np.array_equal(new, ids):
      break
    ids = new
  roots, labels = np.unique(np.where(mask, ids, -1), return_inverse=True)
  labels = labels.reshape(h, w).astype(np.int32)
  if roots[0] == -1:
    return labels, len(roots) - 1
  return labels + 1, len(roots)  # no background pixel at all


def _fill_holes(mask):
  """The mask with every background region not reaching its border filled."""
  labels, _ = label(~np.pad(mask, 1))
  return (labels != labels[0, 0])[1:-1, 1:-1]


def triangle_pointing(mask):
  """Which way a component (bool mask cropped to its box) points: "up" when under TRIANGLE_TOP of its pixels
  lie in the top half of the box, "down" when under that lie in the bottom half (the mirror image), else None."""
  h, total = mask.shape[0], mask.sum()
  if mask[:h // 2].sum() / total < TRIANGLE_TOP:
    return "up"
  if mask[h - h // 2:].sum() / total < TRIANGLE_TOP:
    return "down"
  return None


def classify(mask):
  """The shape name of a component (bool mask cropped to its bounding box), or None; "triangle" either way
  up (`triangle_pointing` tells which)."""
  h, w = mask.shape
  fill = mask.mean()
  if max(h, w) / min(h, w) > MAX_ASPECT or fill < MIN_FILL:
    return None
  if fill >= SQUARE_FILL:
    return "square"
  if fill < CIRCLE_FILL + 0.1 and triangle_pointing(mask):  # before circles: a down one's fill is below theirs
    return "triangle"
  return "circle" if fill >= CIRCLE_FILL else None


def segment(image, tol=TOL):
  """int [H, W]: the palette index (into shapes.COLOURS) of each pixel, -1 for background or unclear."""
  palette = np.array([shapes.PALETTE[c] for c in shapes.COLOURS] + [shapes.BACKGROUND], np.float32)
  dist = np.linalg.norm(image[..., None, :].astype(np.float32) - palette, axis=-1)  # [H, W, 6]
  nearest = dist.argmin(-1)
  ok = (dist.min(-1) <= tol) & (nearest < len(shapes.COLOURS))
  return np.where(ok, nearest, -1)


def detect(image, tol=TOL, min_area=MIN_AREA):
  """Objects in a uint8 image [H, W, 3]: dicts with colour, shape (None when unrecognized), size, bbox
  [x0, y0, x1, y1] and area in the image's pixels, size_px (extent) and centre [x, y] on a 64 px canvas
  (what the size words and the relation margin are defined on), fill; triangles also "pointing" ("up"|"down")."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise SanaError(f"image of shape {image.shape}; expected [H, W, 3]")
  colours = segment(image, tol)
  scale = shapes.IMAGE / max(image.shape[:2])
  found = []
  for k, colour in enumerate(shapes.COLOURS):
    labels, n = label(colours == k)
    for i in range(1, n + 1):
      ys, xs = np.nonzero(labels == i)
      if len(ys) < min_area:
        continue
      y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
      crop = _fill_holes(labels[y0:y1, x0:x1] == i)
      extent = max(y1 - y0, x1 - x0) * scale
      shape = classify(crop)
      found.append({"colour": colour, "shape": shape, "size": "large" if extent >= LARGE_FROM else "small",
                    "size_px": round(float(extent), 1), "bbox": [int(x0), int(y0), int(x1), int(y1)],
                    "centre": [(x0 + x1) / 2 * scale, (y0 + y1) / 2 * scale], "area": int(crop.sum()),
                    "fill": round(float(crop.mean()), 3)})
      if shape == "triangle":
        found[-1]["pointing"] = triangle_pointing(crop)
  return found


# ---- scoring


def _check_triangle(triangle):
  if triangle not in shapes.TRIANGLES:
    raise SanaError(f"triangle {triangle!r}; expected one of {', '.join(shapes.TRIANGLES)}")


def score(spec, objects, triangle="up"):
  """The checks that apply to `spec` (a Spec or prompt) on detected (or ground-truth) objects, each
  True/False, plus "correct" (all passed) and "score" (1.0 or 0.0). Only triangles pointing `triangle`
  count as triangles (an object without "pointing", as ground truth by default, points up)."""
  spec = parse_prompt(spec) if isinstance(spec, str) else spec
  _check_triangle(triangle)
  matching = lambda colour, shape: [o for o in objects if o["colour"] == colour and o["shape"] == shape
                                    and (shape != "triangle" or o.get("pointing", "up") == triangle)]
  a = matching(spec.colour, spec.shape)
  checks = {"object": bool(a)}
  if spec.category == "single" and spec.size:
    checks["size"] = any(o["size"] == spec.size for o in a)
  elif spec.category == "count":
    checks["count"] = len(a) == spec.count
  elif spec.category == "relation":
    b = matching(spec.colour2, spec.shape2)
    checks["object"] = bool(a) and bool(b)
    checks["relation"] = any(oa is not ob and bool(shapes.relation_holds(spec.relation, oa["centre"], ob["centre"]))
                             for oa in a for ob in b)
  correct = all(checks.values())
  return {**checks, "correct": correct, "score": float(correct)}


def triangle_orientation(results):
  """How prompted triangles point, over `results` ({"prompt", "detected": objects}, as `evaluate` makes them;
  for images use detect(image) as "detected") whose prompt names a triangle: {"down", "up": the fraction
  whose triangles in the prompt's triangle colours are all detected pointing that way (at least one), "n":
  how many such prompts}. Prompts with no such triangle, or both ways, count in neither; fractions are
  None when n = 0."""
  down = up = n = 0
  for r in results:
    colours = {c for c, s in parse_prompt(r["prompt"]).pairs() if s == "triangle"}
    if not colours:
      continue
    ways = {o.get("pointing", "up") for o in r["detected"] if o["shape"] == "triangle" and o["colour"] in colours}
    n += 1
    down += ways == {"down"}
    up += ways == {"up"}
  fraction = lambda k: round(k / n, 4) if n else None
  return {"down": fraction(down), "up": fraction(up), "n": n}


# ---- prompt sets


def make_prompt_set(seed, n, heldout_fraction=0.25):
  """n prompts: [{"prompt", "category", "heldout"}], seen pairs first (single/count/relation in turn),
  then single objects of held-out pairs (cycling through all 9: 3 pairs x {no size word, small, large})."""
  if n <= 0 or not 0 <= heldout_fraction <= 1:
    raise SanaError(f"prompt set of n={n}, heldout_fraction={heldout_fraction}: need n > 0 and a fraction in [0, 1]")
  rng = np.random.default_rng([int(seed), 7])
  n_held = round(n * heldout_fraction)
  out = []
  for i in range(n - n_held):
    while True:  # seen pairs of the wanted category, as the training split draws them
      spec = shapes.sample_spec(rng, "train")
      if spec.category == CATEGORIES[i % 3]:
        break
    out.append({"prompt": shapes.caption(spec), "category": spec.category, "heldout": False})
  held = [shapes.Spec("single", c, s, size=z) for c, s in shapes.HELD_OUT for z in (None, "small", "large")]
  order = rng.permutation(len(held))
  for i in range(n_held):
    out.append({"prompt": shapes.caption(held[order[i % len(held)]]), "category": "single", "heldout": True})
  return out


# ---- evaluation


def to_uint8(images):
  """A batch (uint8 or float in [0, 1] array [B, H, W, 3], or a list of PIL images / arrays) -> list of uint8."""
  out = []
  for im in images:
    a = np.asarray(im)
    if a.dtype != np.uint8:
      a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    out.append(a[..., :3] if a.ndim == 3 else np.repeat(a[..., None], 3, -1))
  return out


def evaluate(generate_fn, prompts, *, seed=0, batch_size=16, grid_path=None, tol=TOL, min_area=MIN_AREA,
             triangle="up"):
  """Scores `generate_fn(prompts: list[str], seed: int) -> images` (see `to_uint8`) on `prompts`
  (strings, or make_prompt_set's dicts), prompted triangles pointing `triangle`. The batch starting at
  prompt i uses seed + i. Returns the report (module doc); writes the sample grid to `grid_path` when given."""
  items = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
  specs = [parse_prompt(p["prompt"]) for p in items]  # all bad prompts fail before any generation
  _check_triangle(triangle)
  results, images = [], []
  for start in range(0, len(items), batch_size):
    batch = [p["prompt"] for p in items[start:start + batch_size]]
    generated = to_uint8(generate_fn(batch, seed + start))
    if len(generated) != len(batch):
      raise SanaError(f"generate_fn returned {len(generated)} images for {len(batch)} prompts")
    images += generated
  keys = ("colour", "shape", "size", "centre", "pointing")  # pointing: triangles only
  for item, spec, image in zip(items, specs, images):
    objects = detect(image, tol, min_area)
    results.append({"prompt": item["prompt"], "category": spec.category, "heldout": spec.involves_held_out(),
                    **score(spec, objects, triangle),
                    "detected": [{k: o[k] for k in keys if k in o} for o in objects]})
  report = summarize(results)
  if grid_path:
    write_grid(grid_path, images, [r["prompt"] for r in results], [r["correct"] for r in results])
  return report


def summarize(results):
  mean = lambda rs: round(float(np.mean([r["score"] for r in rs])), 4) if rs else None
  checks = ("object", "size", "count", "relation")
  return {
      "score": mean(results), "n": len(results),
      "by_category": {c: mean([r for r in results if r["category"] == c]) for c in CATEGORIES},
      "by_split": {"seen": mean([r for r in results if not r["heldout"]]),
                   "heldout": mean([r for r in results if r["heldout"]])},
      "by_check": {c: (round(float(np.mean([r[c] for r in results if c in r])), 4)
                       if any(c in r for r in results) else None) for c in checks},
      "triangles": triangle_orientation(results),
      "results": results}


def write_grid(path, images, labels, correct=None, cols=8, scale=2):
  """A PNG of the images in order, each scaled up `scale` times over its wrapped label; a green (correct)
  or red frame when `correct` is given. Written to a temporary name and renamed: never half-written."""
  from PIL import Image, ImageDraw, ImageFont
  if not images:
    raise SanaError("no images to put in a grid")
  h, w = images[0].shape[:2]
  th, tw, pad, text_h = h * scale, w * scale, 4, 40
  rows = -(-len(images) // cols)
  grid = Image.new("RGB", (cols * (tw + 2 * pad), rows * (th + 2 * pad + text_h)), "white")
  draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
  for i, (im, text) in enumerate(zip(images, labels)):
    x, y = (i % cols) * (tw + 2 * pad), (i // cols) * (th + 2 * pad + text_h)
    if correct is not None:
      frame = (40, 170, 40) if correct[i] else (210, 30, 30)
      draw.rectangle([x, y, x + tw + 2 * pad - 1, y + th + 2 * pad - 1], fill=frame)
    grid.paste(Image.fromarray(im).resize((tw, th), Image.NEAREST), (x + pad, y + pad))
    lines = textwrap.wrap(text, width=max(8, tw // 6))[:3]
    draw.multiline_text((x + pad, y + th + 2 * pad), "\n".join(lines), fill="black", font=font)
  files.write_image(path, grid)


def reference_generator(prompts, seed, triangle="up"):
  """Ground-truth renders of the prompts (the metric's ceiling, and a check of the detector)."""
  return [shapes.render_prompt(p, np.random.default_rng([seed, i, 11]), triangle) for i, p in enumerate(prompts)]


CALIBRATION_SEED = 31337  # the prompt set quantization calibrates on: no evaluation set uses this seed


def pipeline_generator(model, *, steps, cfg, dtype, height=None, width=None, loras=(), quantize=None):
  """loras: [(LoRA file or directory, scale)] applied to the model's transformer. quantize: a mode of
  SanaPipeline.quantize (w4a4 calibrates on 32 prompts of the CALIBRATION_SEED set)."""
  from sana_jax.pipeline import load_pipeline
  pipe = load_pipeline(model, dtype=dtype)
  pipe.load_loras(loras)
  if quantize:
    prompts = [p["prompt"] for p in make_prompt_set(CALIBRATION_SEED, 32)]
    pipe.quantize(quantize, calibration_prompts=prompts, num_inference_steps=steps, guidance_scale=cfg)

  def generate(prompts, seed):
    return pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, seed=seed, height=height, width=width,
                output_type="np").images
  generate.guidance_scale = pipe.guidance_scale if cfg is None else cfg  # for the report
  return generate


# ---- CLI


def parse_args(argv):
  p = ArgumentParser(prog="python -m sana_jax.demo.evaluate",
                     description="Prompt-image alignment of a Sana model on the shapes grammar.")
  p.add_argument("--model", help="a diffusers-format Sana directory (or hub id)")
  p.add_argument("--reference", action="store_true", help="score ground-truth renders instead of a model")
  p.add_argument("--n", type=int, default=200, help="number of prompts")
  p.add_argument("--heldout-fraction", type=float, default=0.25)
  p.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt set")
  p.add_argument("--out", required=True, help="directory for report.json and grid.png")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's own, else 4.5)")
  p.add_argument("--seed", type=int, default=0, help="the batch starting at prompt i uses seed + i")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--height", type=int)
  p.add_argument("--width", type=int)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                 help="apply this LoRA to the model (as sample.py's --lora); repeatable")
  p.add_argument("--quantize", choices=("int8", "fp8", "w4a4"), help="quantize the model's transformer first")
  p.add_argument("--triangle", default="up", choices=shapes.TRIANGLES,
                 help="the way prompted triangles must point to count (--reference draws them so)")
  args = p.parse_args(argv)
  if args.reference == bool(args.model):
    raise SanaError("give exactly one of --model DIR and --reference")
  if args.batch_size <= 0:
    raise SanaError(f"--batch-size {args.batch_size}: must be positive")
  return args


def run(args):
  prompts = make_prompt_set(args.prompt_seed, args.n, args.heldout_fraction)
  files.output_directory(args.out, "--out", create=False)  # before a model loads
  if args.reference:
    generate = functools.partial(reference_generator, triangle=args.triangle)
  else:
    from sana_jax.convert.diffusers_lora import parse_specs
    generate = pipeline_generator(args.model, steps=args.steps, cfg=args.cfg, dtype=args.dtype,
                                  height=args.height, width=args.width, loras=parse_specs(args.lora),
                                  quantize=args.quantize)
  files.output_directory(args.out, "--out")
  report = evaluate(generate, prompts, seed=args.seed, batch_size=args.batch_size,
                    grid_path=os.path.join(args.out, "grid.png"), triangle=args.triangle)
  report["settings"] = {k: getattr(args, k) for k in ("model", "reference", "n", "heldout_fraction", "prompt_seed",
                                                     "steps", "seed", "height", "width", "dtype", "triangle", "lora",
                                                     "quantize")}
  report["settings"]["cfg"] = getattr(generate, "guidance_scale", None)  # the one used: the model's, if not given
  files.write_json(os.path.join(args.out, "report.json"), report, indent=1)
  return report


@cli_main
def main(argv=None):
  report = run(parse_args(sys.argv[1:] if argv is None else argv))
  print(json.dumps({k: report[k] for k in ("score", "n", "by_category", "by_split", "by_check", "triangles")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
