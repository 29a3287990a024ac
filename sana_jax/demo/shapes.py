"""Synthetic shapes: flat-coloured circles, squares and triangles on white, with exact captions.

    image, caption, objects = shapes.generate(index=0, seed=0, split="train")
    # uint8 [64, 64, 3], "a red circle above a blue square",
    # [{"colour": "red", "shape": "circle", "size": "large", "size_px": 24, "bbox": [x0, y0, x1, y1],
    #   "centre": [cx, cy]}, ...]  (pixels, y down, x1/y1 exclusive, centre = bbox centre)

Grammar (every caption is one of these; `parse` reads them back into a `Spec`):
  single    "a [small|large] {colour} {shape}"                 one object; the size word is optional
  count     "{two|three} {colour} {shape}s"                     2 or 3 identical colour+shape objects
  relation  "a {colour} {shape} {to the left of|to the right of|above|below} a {colour} {shape}"
Each image holds exactly the objects its caption names (nothing else), so a caption is a complete
description. Count images draw each object's size class independently (the caption says nothing about
size); when three large objects do not fit, the layout falls back to small ones.

Relations (`relation_holds`, shared with the evaluation): with d = centre(B) - centre(A), y down,
"A left of B" iff d_x >= RELATION_MARGIN and |d_y| < d_x (likewise for the other three). Training
layouts are drawn clearer still: |off-axis| < CLEAR_RATIO * on-axis.

Held out of train and validation, images and captions alike: (yellow, triangle), (purple, circle),
(green, square). The "heldout" split holds only examples with at least one such object, for evaluation.

Triangles point up unless `triangle="down"` is passed (render, generate, export_folder, the CLI's --triangle):
the same masks flipped vertically, with the same captions and layouts, for training an orientation LoRA.
Only then do triangle objects carry "pointing": "down" (the defaults' outputs are unchanged).
"""
import argparse
import dataclasses
import functools
import os
import re
import sys

import numpy as np

from sana_jax.errors import ArgumentParser, SanaError, cli_main

IMAGE = 64
BACKGROUND = (255, 255, 255)
PALETTE = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 200, 40),
           "purple": (150, 60, 190)}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
TRIANGLES = ("up", "down")  # orientations; "up" is the shipped data's
SIZE_RANGES = {"small": (12, 16), "large": (22, 28)}  # side of the bounding box in pixels, inclusive
HELD_OUT = (("yellow", "triangle"), ("purple", "circle"), ("green", "square"))
SEEN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT)
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
NUMBERS = {2: "two", 3: "three"}
SPLITS = {"train": 0, "validation": 1, "heldout": 2}  # mixed into each example's seed
CATEGORY_PROBS = {"single": 0.3, "count": 0.3, "relation": 0.4}  # relations are the hardest to learn

GAP = 2               # min empty pixels between two objects' bounding boxes
BORDER = 1            # min pixels between an object and the image edge
RELATION_MARGIN = 8   # min centre offset (px) along the relation's axis
CLEAR_RATIO = 0.5     # generated layouts: off-axis offset below this fraction of the on-axis one
_TRIES = 64           # candidate positions drawn at once per object


def is_held_out(colour, shape):
  return (colour, shape) in HELD_OUT


@dataclasses.dataclass(frozen=True)
class Spec:
  """A caption's meaning. `size` only for "single" (None: no size word); `count` 2 or 3 for "count";
  `relation` (a RELATIONS key) and the second object (`colour2`, `shape2`) only for "relation"."""
  category: str
  colour: str
  shape: str
  size: str | None = None
  count: int = 1
  relation: str | None = None
  colour2: str | None = None
  shape2: str | None = None

  def pairs(self):
    """The (colour, shape) pairs the caption mentions."""
    return [(self.colour, self.shape)] + ([(self.colour2, self.shape2)] if self.category == "relation" else [])

  def involves_held_out(self):
    return any(is_held_out(*p) for p in self.pairs())


def caption(spec):
  if spec.category == "single":
    return " ".join(["a"] + ([spec.size] if spec.size else []) + [spec.colour, spec.shape])
  if spec.category == "count":
    return f"{NUMBERS[spec.count]} {spec.colour} {spec.shape}s"
  return f"a {spec.colour} {spec.shape} {RELATIONS[spec.relation]} a {spec.colour2} {spec.shape2}"


_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_SINGLE = re.compile(rf"a (?:(small|large) )?({_C}) ({_S})")
_COUNT = re.compile(rf"(two|three) ({_C}) ({_S})s")
_RELATION = re.compile(rf"a ({_C}) ({_S}) ({'|'.join(RELATIONS.values())}) a ({_C}) ({_S})")


def normalize(text):
  """Lower case, single spaces, no trailing full stop: the form `parse` matches."""
  return " ".join(text.lower().split()).rstrip(".").strip()


def parse(text):
  """The `Spec` of a caption in the grammar, or None when it is outside it."""
  text = normalize(text)
  if m := _SINGLE.fullmatch(text):
    return Spec("single", m[2], m[3], size=m[1])
  if m := _COUNT.fullmatch(text):
    return Spec("count", m[2], m[3], count={v: k for k, v in NUMBERS.items()}[m[1]])
  if m := _RELATION.fullmatch(text):
    relation = {v: k for k, v in RELATIONS.items()}[m[3]]
    return Spec("relation", m[1], m[2], relation=relation, colour2=m[4], shape2=m[5])
  return None


def relation_holds(relation, a_centre, b_centre, ratio=1.0):
  """Whether "A {relation} B" holds for centres (x, y) (y down); b_centre may be [N, 2] (-> [N] bool).
  The on-axis offset must reach RELATION_MARGIN and exceed the off-axis one (times 1/ratio)."""
  d = np.asarray(b_centre, np.float64) - np.asarray(a_centre, np.float64)
  dx, dy = d[..., 0], d[..., 1]
  on, off = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
  return (on >= RELATION_MARGIN) & (np.abs(off) < ratio * on)


def sample_spec(rng, split):
  """A random caption meaning for `split`: seen pairs only for train/validation; at least one held-out
  pair for "heldout"."""
  seen, held = SEEN_PAIRS, HELD_OUT
  pick = lambda pool: pool[rng.integers(len(pool))]
  category = list(CATEGORY_PROBS)[rng.choice(len(CATEGORY_PROBS), p=list(CATEGORY_PROBS.values()))]
  first = pick(held if split == "heldout" else seen)
  if category == "single":
    size = [None, "small", "large"][rng.integers(3)]  # with the size word two times in three
    return Spec("single", *first, size=size)
  if category == "count":
    return Spec("count", *first, count=int(rng.integers(2, 4)))
  second = pick([p for p in seen + (held if split == "heldout" else ()) if p != first])
  if split == "heldout" and rng.integers(2):  # the held-out object as the relation's object, too
    first, second = second, first
  return Spec("relation", *first, relation=list(RELATIONS)[rng.integers(4)], colour2=second[0], shape2=second[1])


def _size(rng, size_class):
  lo, hi = SIZE_RANGES[size_class]
  return int(rng.integers(lo, hi + 1))


def _clear_of(cand, d, boxes):
  """[N] bool: candidates' top-left corners (x, y) of side d keep GAP pixels from every box (x, y, side)."""
  ok = np.ones(len(cand), bool)
  for x, y, s in boxes:
    ok &= ((cand[:, 0] >= x + s + GAP) | (cand[:, 0] + d + GAP <= x) |
           (cand[:, 1] >= y + s + GAP) | (cand[:, 1] + d + GAP <= y))
  return ok


def _place(sides, rng, relation=None):
  """Top-left corners for squares of `sides` that keep apart (and, for two, satisfy `relation`
  clearly, first relative to second), or None when a random draw finds no room."""
  boxes = []
  for i, d in enumerate(sides):
    cand = rng.integers(BORDER, IMAGE - BORDER - d + 1, size=(_TRIES, 2))
    ok = _clear_of(cand, d, boxes)
    if relation is not None and i == 1:
      x, y, s = boxes[0]
      ok &= relation_holds(relation, (x + s / 2, y + s / 2), cand + d / 2, ratio=CLEAR_RATIO)
    if not ok.any():
      return None
    x, y = cand[np.argmax(ok)]
    boxes.append((int(x), int(y), d))
  return boxes


def layout(spec, rng, max_tries=100):
  """Objects (see module doc) that make `spec` true and nothing else."""
  if spec.category == "single":
    classes = [spec.size or ("small", "large")[rng.integers(2)]]
    pairs = [(spec.colour, spec.shape)]
  elif spec.category == "count":
    classes = [("small", "large")[k] for k in rng.integers(2, size=spec.count)]
    pairs = [(spec.colour, spec.shape)] * spec.count
  else:
    classes = [("small", "large")[k] for k in rng.integers(2, size=2)]
    pairs = [(spec.colour, spec.shape), (spec.colour2, spec.shape2)]
  for attempt in range(max_tries):
    if attempt == max_tries // 2 and spec.category != "single":
      classes = ["small"] * len(classes)  # crowded: give up on large ones
    sides = [_size(rng, c) for c in classes]
    boxes = _place(sides, rng, spec.relation)
    if boxes is not None:
      return [_object(colour, shape, cls, x, y, d) for (colour, shape), cls, (x, y, d) in zip(pairs, classes, boxes)]
  raise RuntimeError(f"no layout found for {spec}")  # not reached for this grammar at 64 px


def _object(colour, shape, size_class, x, y, d):
  return {"colour": colour, "shape": shape, "size": size_class, "size_px": d, "bbox": [x, y, x + d, y + d],
          "centre": [x + d / 2, y + d / 2]}


def _check_triangle(triangle):
  if triangle not in TRIANGLES:
    raise ValueError(f"triangle {triangle!r}; expected one of {TRIANGLES}")


@functools.cache
def shape_mask(shape, d, triangle="up"):
  """bool [d, d]: the shape filling a d x d box, sampled at pixel centres (no anti-aliasing); triangles point
  `triangle` ("down": the "up" mask flipped vertically, so both detect alike, mirrored)."""
  _check_triangle(triangle)
  if shape == "triangle" and triangle == "down":
    return np.flipud(shape_mask(shape, d))
  c = np.arange(d) + 0.5 - d / 2  # pixel-centre offsets from the box centre
  if shape == "square":
    return np.ones((d, d), bool)
  if shape == "circle":
    return c[:, None] ** 2 + c[None, :] ** 2 <= (d / 2) ** 2
  # triangle pointing up: apex row (one or two pixels) to a full-width base row
  half = (np.arange(d) + 1) / 2
  return np.abs(c)[None, :] <= half[:, None]


def render(objects, size=IMAGE, triangle="up"):
  """uint8 [size, size, 3]; triangles point as their "pointing" says, else `triangle`."""
  image = np.full((size, size, 3), BACKGROUND, np.uint8)
  for o in objects:
    x0, y0, x1, y1 = o["bbox"]
    image[y0:y1, x0:x1][shape_mask(o["shape"], x1 - x0, o.get("pointing", triangle))] = PALETTE[o["colour"]]
  return image


def orient(objects, triangle):
  """The objects with "pointing" on triangles when not "up" (so the default outputs stay as they were)."""
  _check_triangle(triangle)
  if triangle == "up":
    return objects
  return [{**o, "pointing": triangle} if o["shape"] == "triangle" else o for o in objects]


def rng_for(index, seed, split):
  if split not in SPLITS:
    raise ValueError(f"split {split!r}; expected one of {sorted(SPLITS)}")
  return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def generate(index, seed=0, split="train", triangle="up"):
  """(image uint8 [64, 64, 3], caption, objects) for example `index`; a pure function of its arguments.
  `triangle` changes only how triangles are drawn (and their "pointing"), never the caption or layout."""
  rng = rng_for(index, seed, split)
  spec = sample_spec(rng, split)
  objects = orient(layout(spec, rng), triangle)
  return render(objects), caption(spec), objects


def render_prompt(prompt, rng, triangle="up"):
  """A ground-truth image for a caption in the grammar (any pairs, held-out ones included)."""
  spec = parse(prompt)
  if spec is None:
    raise ValueError(f"prompt {prompt!r} is outside the shapes grammar")
  return render(orient(layout(spec, rng), triangle))


def _shape_filter(with_shapes, without_shapes):
  """A caption predicate: it mentions some shape of `with_shapes` (None: any) and none of `without_shapes`."""
  want, avoid = set(with_shapes or SHAPES), set(without_shapes or ())
  if unknown := sorted((want | avoid) - set(SHAPES)):
    raise ValueError(f"shapes {unknown}; expected some of {SHAPES}")
  if not want - avoid or avoid >= set(SHAPES):
    raise ValueError(f"no caption mentions one of {sorted(want)} and none of {sorted(avoid)}")

  def keep(text):
    mentioned = {s for _, s in parse(text).pairs()}
    return bool(mentioned & want) and not mentioned & avoid
  return keep


def export_folder(directory, n, seed=0, split="train", triangle="up", with_shapes=None, without_shapes=None):
  """Writes n examples as DIR/000000.png + .txt caption sidecars (the `folder:DIR` data source); returns
  their indices. With a shape filter (see `_shape_filter`; e.g. with_shapes=("triangle",) for an orientation
  LoRA, without_shapes=("triangle",) for a set that leaves triangles alone), examples 0, 1, 2, ... that pass
  are kept until there are n, each written under its own index, so file k is `generate(k, seed, split, triangle)`."""
  from PIL import Image

  from sana_jax import files
  keep = _shape_filter(with_shapes, without_shapes) if with_shapes or without_shapes else None
  _check_triangle(triangle)
  files.output_directory(directory)
  written, i = [], 0
  while len(written) < n:
    image, text, _ = generate(i, seed, split, triangle)
    if keep is None or keep(text):
      stem = os.path.join(directory, f"{i:06d}")
      files.write_image(stem + ".png", Image.fromarray(image))
      with files.atomic_write(stem + ".txt", "w", encoding="utf-8") as f:
        f.write(text + "\n")
      written.append(i)
    i += 1
  return written


def _shape_list(text):
  """Parses "triangle,circle" -> ("triangle", "circle"), checked against SHAPES (argparse reports errors)."""
  names = tuple(s.strip() for s in text.split(",") if s.strip())
  if not names or set(names) - set(SHAPES):
    raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated shapes from {', '.join(SHAPES)}")
  return names


@cli_main
def main(argv=None):
  p = ArgumentParser(prog="python -m sana_jax.demo.shapes",
                     description="Write shapes examples as an image folder with caption sidecars.")
  p.add_argument("--out", required=True)
  p.add_argument("--n", type=int, default=20000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--split", default="train", choices=["train", "validation"])
  p.add_argument("--triangle", default="up", choices=TRIANGLES, help="which way triangles point")
  p.add_argument("--with-shapes", type=_shape_list, help="keep only captions mentioning one of these, e.g. triangle")
  p.add_argument("--without-shapes", type=_shape_list, help="drop captions mentioning any of these")
  args = p.parse_args(argv)
  if args.n < 0:
    raise SanaError(f"--n {args.n}: expected a non-negative number of examples")
  try:
    export_folder(args.out, args.n, args.seed, args.split, args.triangle, args.with_shapes, args.without_shapes)
  except ValueError as e:  # a filter nothing passes
    raise SanaError(f"--with-shapes/--without-shapes: {e}") from None
  print(f"wrote {args.n} {args.split} examples to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
