"""The shapes demo: dataset generation, held-out pairs, the TFDS builder, and the alignment evaluation."""
import functools
import itertools
import json

import numpy as np
import pytest

from sana_jax.demo import evaluate as ev
from sana_jax.demo import shapes
from sana_jax.errors import SanaError

HELD_OUT_WORDS = [f"{c} {s}" for c, s in shapes.HELD_OUT]


def examples(n, split="train", seed=0):
  return [shapes.generate(i, seed, split) for i in range(n)]


def gap(a, b):
  """Empty pixels between two bboxes along the axis that separates them most."""
  return max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3])


def test_generate_is_deterministic_per_index_seed_and_split():
  a, b = shapes.generate(17, 3, "train"), shapes.generate(17, 3, "train")
  assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
  assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
  others = [shapes.generate(17, 4, "train"), shapes.generate(17, 3, "validation"), shapes.generate(18, 3, "train")]
  assert all(not np.array_equal(a[0], o[0]) for o in others)
  with pytest.raises(ValueError):
    shapes.generate(0, 0, "test")


def test_colours_exact_and_objects_apart():
  allowed = {tuple(v) for v in shapes.PALETTE.values()} | {shapes.BACKGROUND}
  for image, _, objects in examples(300):
    assert {tuple(p) for p in image.reshape(-1, 3)} <= allowed  # flat colours, no anti-aliasing
    assert len(ev.detect(image)) == len(objects)  # every object drawn, none merged with another
    for o in objects:
      x0, y0, x1, y1 = o["bbox"]
      lo, hi = shapes.SIZE_RANGES[o["size"]]
      assert lo <= o["size_px"] == x1 - x0 == y1 - y0 <= hi and 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
      patch = image[y0:y1, x0:x1]
      inside = shapes.shape_mask(o["shape"], o["size_px"])
      assert (patch[inside] == shapes.PALETTE[o["colour"]]).all() and (patch[~inside] == 255).all()
    for a, b in itertools.combinations(objects, 2):
      assert gap(a["bbox"], b["bbox"]) >= shapes.GAP
    painted = (image != 255).any(-1).sum()
    assert painted == sum(shapes.shape_mask(o["shape"], o["size_px"]).sum() for o in objects)


def test_captions_match_objects_and_all_forms_appear():
  forms = set()
  for _, caption, objects in examples(600):
    spec = shapes.parse(caption)
    assert spec is not None and shapes.caption(spec) == caption
    assert ev.score(spec, objects)["correct"], (caption, objects)
    pairs = {(o["colour"], o["shape"]) for o in objects}
    if spec.category == "single":
      assert len(objects) == 1 and spec.size in (None, objects[0]["size"])
    elif spec.category == "count":
      assert len(objects) == spec.count and pairs == {(spec.colour, spec.shape)}
    else:
      assert len(objects) == 2 and [(o["colour"], o["shape"]) for o in objects] == spec.pairs()
      assert shapes.relation_holds(spec.relation, objects[0]["centre"], objects[1]["centre"])
    forms.add((spec.category, spec.size is not None, spec.count, spec.relation))
  assert forms == {("single", False, 1, None), ("single", True, 1, None), ("count", False, 2, None),
                   ("count", False, 3, None)} | {("relation", False, 1, r) for r in shapes.RELATIONS}


def test_held_out_pairs_never_in_train_or_validation():
  for split, n in (("train", 3000), ("validation", 1000)):
    for _, caption, objects in examples(n, split, seed=1):
      assert not any(shapes.is_held_out(o["colour"], o["shape"]) for o in objects)
      assert not shapes.parse(caption).involves_held_out()
      assert not any(w in caption for w in HELD_OUT_WORDS)
  held = examples(200, "heldout")
  assert all(shapes.parse(c).involves_held_out() for _, c, _ in held)
  assert all(any(shapes.is_held_out(o["colour"], o["shape"]) for o in objs) for _, _, objs in held)
  assert {shapes.parse(c).category for _, c, _ in held} == {"single", "count", "relation"}


def test_grammar_and_relation_definition():
  assert shapes.parse("  A Large  Blue Square. ") == shapes.Spec("single", "blue", "square", size="large")
  assert shapes.parse("three red triangles") == shapes.Spec("count", "red", "triangle", count=3)
  assert shapes.parse("a red circle to the left of a blue square") == shapes.Spec(
      "relation", "red", "circle", relation="left", colour2="blue", shape2="square")
  for bad in ("a cat", "four red circles", "a red circle near a blue square", "a red circles", "", "a orange circle"):
    assert shapes.parse(bad) is None
    with pytest.raises(SanaError):
      ev.parse_prompt(bad)
  holds = lambda rel, a, b: bool(shapes.relation_holds(rel, a, b))
  assert holds("left", (10, 30), (30, 40)) and holds("right", (30, 40), (10, 30))
  assert holds("above", (30, 10), (35, 40)) and holds("below", (35, 40), (30, 10))
  assert not holds("left", (10, 30), (30, 50))  # |dy| = |dx|: diagonal, neither
  assert not holds("left", (10, 30), (10 + shapes.RELATION_MARGIN - 1, 30))  # too close
  assert not holds("left", (30, 30), (10, 30))


def test_detector_recovers_ground_truth():
  for image, _, objects in examples(150, "heldout", seed=2):
    found = sorted((d["colour"], d["shape"], d["size"], tuple(d["centre"])) for d in ev.detect(image))
    assert found == sorted((o["colour"], o["shape"], o["size"], tuple(o["centre"])) for o in objects)


def test_label_fallback_matches_scipy():
  rng = np.random.default_rng(0)
  for p in (0.3, 0.5, 0.7):
    mask = rng.random((33, 47)) < p
    ours, n = ev._label_numpy(mask)
    ref, m = ev.label(mask)
    assert n == m and np.array_equal(ours, ref)
  assert ev._label_numpy(np.ones((4, 5), bool))[1] == 1 and ev._label_numpy(np.zeros((4, 5), bool))[1] == 0


def test_prompt_set_and_ground_truth_score_one(tmp_path):
  prompts = ev.make_prompt_set(0, 40)
  assert prompts == ev.make_prompt_set(0, 40) and prompts != ev.make_prompt_set(1, 40)
  held = [p for p in prompts if p["heldout"]]
  assert len(held) == 10 and all(p["category"] == "single" and ev.parse_prompt(p["prompt"]).involves_held_out()
                                 for p in held)
  seen = [p for p in prompts if not p["heldout"]]
  assert {p["category"] for p in seen} == set(ev.CATEGORIES)
  assert not any(ev.parse_prompt(p["prompt"]).involves_held_out() for p in seen)
  report = ev.evaluate(ev.reference_generator, prompts, batch_size=16, grid_path=str(tmp_path / "grid.png"))
  assert report["score"] == 1.0 and report["n"] == 40
  assert report["by_category"] == {"single": 1.0, "count": 1.0, "relation": 1.0}
  assert report["by_split"] == {"seen": 1.0, "heldout": 1.0}
  assert all(v == 1.0 for v in report["by_check"].values())
  from PIL import Image
  assert Image.open(tmp_path / "grid.png").size[0] == 8 * (128 + 8)


def wrong_images():
  """(prompt, image, the check that must fail): each image is deliberately wrong for its prompt."""
  rng = lambda i: np.random.default_rng(i)
  rel = "a red circle to the left of a blue square"
  swapped = shapes.render_prompt("a blue circle to the left of a red square", rng(0))
  mirrored = shapes.render_prompt("a red circle to the right of a blue square", rng(1))
  vertical = shapes.render_prompt("a green triangle below a yellow square", rng(2))
  return [
      (rel, swapped, "object"),
      (rel, mirrored, "relation"),
      ("a green triangle above a yellow square", vertical, "relation"),
      ("two blue triangles", shapes.render_prompt("three blue triangles", rng(3)), "count"),
      ("three blue triangles", shapes.render_prompt("two blue triangles", rng(4)), "count"),
      ("a large red square", shapes.render_prompt("a small red square", rng(5)), "size"),
      ("a red circle", shapes.render_prompt("a red square", rng(6)), "object"),
      ("a purple circle", shapes.render_prompt("a blue circle", rng(7)), "object"),
      ("a yellow triangle", np.full((64, 64, 3), 255, np.uint8), "object"),
      ("two red circles", np.zeros((64, 64, 3), np.uint8), "object"),
      (rel, np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8), "object"),
  ]


@pytest.mark.parametrize("case", range(len(wrong_images())))
def test_wrong_images_fail(case):
  prompt, image, check = wrong_images()[case]
  result = ev.score(prompt, ev.detect(image))
  assert result[check] is False and result["correct"] is False and result["score"] == 0.0


def test_evaluate_reports_failures():
  wrong = wrong_images()
  generate = lambda batch, seed: [wrong[seed + i][1] for i in range(len(batch))]  # seed = batch start
  report = ev.evaluate(generate, [p for p, _, _ in wrong], batch_size=4)
  assert report["score"] == 0.0 and report["n"] == len(wrong)
  assert report["by_split"]["heldout"] == 0.0 and report["by_category"]["relation"] == 0.0
  with pytest.raises(SanaError, match="returned 0 images"):
    ev.evaluate(lambda batch, seed: [], [wrong[0][0]])


def test_tfds_builder_reads_back_and_trains(tmp_path):
  import tensorflow_datasets as tfds

  from sana_jax import data
  from sana_jax.demo import tfds_shapes
  name = tfds_shapes.build(str(tmp_path), num_train=12, num_validation=4, seed=5)
  assert name == "sana_shapes/n12_v4_s5"
  assert tfds_shapes.build(str(tmp_path), num_train=12, num_validation=4, seed=5) == name  # prepared: reused
  ds = tfds.data_source(name, split="train", data_dir=str(tmp_path))
  assert len(ds) == 12 and len(tfds.data_source(name, split="validation", data_dir=str(tmp_path))) == 4
  for i in range(len(ds)):
    ex = ds[i]
    split, index = ex["key"].decode().split("/")
    image, caption, objects = shapes.generate(int(index), 5, split)
    assert np.array_equal(ex["image"], image) and ex["caption"].decode() == caption
    assert json.loads(ex["objects"]) == objects
  cfg = dict(source=f"tfds:{name}", data_dir=str(tmp_path), buckets=[(64, 64)], shuffle=False)
  it = data.make_train_iterator(cfg, global_batch=4, seed=0)
  batch = next(it)
  assert batch["images"].shape == (4, 64, 64, 3) and batch["images"].max() == 1.0
  assert all(shapes.parse(str(c)) is not None for c in batch["captions"])
  with pytest.raises(SanaError):
    tfds_shapes.build(str(tmp_path), config="huge")


def test_folder_export_reads_as_folder_source(tmp_path):
  from sana_jax import data
  shapes.export_folder(str(tmp_path / "shapes"), 6, seed=2)
  assert (tmp_path / "shapes" / "000005.txt").read_text().strip() == shapes.generate(5, 2, "train")[1]
  it = data.make_train_iterator(dict(source=f"folder:{tmp_path / 'shapes'}", buckets=[(64, 64)]), global_batch=2)
  assert next(it)["images"].shape == (2, 64, 64, 3)


def test_evaluate_cli(tmp_path, capsys):
  out = tmp_path / "eval"
  assert ev.main(["--reference", "--n", "9", "--out", str(out), "--batch-size", "4"]) == 0
  report = json.loads((out / "report.json").read_text())
  assert report["score"] == 1.0 and report["n"] == 9 and (out / "grid.png").exists()
  assert json.loads(capsys.readouterr().out)["score"] == 1.0
  for argv in (["--n", "5", "--out", str(tmp_path / "x")],                         # neither model nor reference
               ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "y")],
               ["--reference", "--n", "0", "--out", str(tmp_path / "z")],
               ["--reference", "--n", "many", "--out", str(tmp_path / "z")]):
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
  assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


# ---- triangles pointing down (the orientation LoRA's data and its proof)


def test_down_triangles_detected_at_every_size():
  for size_class, (lo, hi) in shapes.SIZE_RANGES.items():
    for d in range(lo, hi + 1):
      for way in shapes.TRIANGLES:
        if way == "down":
          assert np.array_equal(shapes.shape_mask("triangle", d, way), shapes.shape_mask("triangle", d)[::-1])
        obj = shapes._object("red", "triangle", size_class, 20, 17, d)
        for image in (shapes.render([obj], triangle=way), shapes.render([{**obj, "pointing": way}])):
          (found,) = ev.detect(image)
          assert (found["shape"], found["pointing"], found["size"]) == ("triangle", way, size_class), (d, way)
      for shape in ("circle", "square"):  # unchanged: no orientation, and not mistaken for triangles
        assert np.array_equal(shapes.shape_mask(shape, d, "down"), shapes.shape_mask(shape, d))
        (found,) = ev.detect(shapes.render([shapes._object("blue", shape, size_class, 5, 9, d)], triangle="down"))
        assert found["shape"] == shape and "pointing" not in found


def test_down_examples_keep_captions_and_layouts():
  with pytest.raises(ValueError):
    shapes.generate(0, triangle="left")
  n_triangles = 0
  for i in range(120):
    up, down = shapes.generate(i, 3, "train"), shapes.generate(i, 3, "train", triangle="down")
    assert up[1] == down[1] and all("pointing" not in o for o in up[2])  # the default output is as before
    assert [{k: v for k, v in o.items() if k != "pointing"} for o in down[2]] == up[2]
    assert all(o.get("pointing") == ("down" if o["shape"] == "triangle" else None) for o in down[2])
    has_triangle = "triangle" in up[1]
    n_triangles += has_triangle
    assert np.array_equal(up[0], down[0]) != has_triangle
    spec, found = shapes.parse(down[1]), ev.detect(down[0])
    assert sorted((d["colour"], d["shape"], d.get("pointing"), tuple(d["centre"])) for d in found) == sorted(
        (o["colour"], o["shape"], o.get("pointing"), tuple(o["centre"])) for o in down[2])
    assert ev.score(spec, down[2], triangle="down")["correct"] and ev.score(spec, found, triangle="down")["correct"]
    assert ev.score(spec, found)["correct"] != has_triangle  # a down triangle is no up one
    assert ev.score(spec, ev.detect(up[0]), triangle="down")["correct"] != has_triangle
  assert n_triangles > 20


def test_triangle_orientation_of_reference_renders():
  prompts = ev.make_prompt_set(0, 40)
  n = sum("triangle" in p["prompt"] for p in prompts)
  down = ev.evaluate(functools.partial(ev.reference_generator, triangle="down"), prompts, triangle="down")
  assert down["score"] == 1.0 and down["triangles"] == {"down": 1.0, "up": 0.0, "n": n} and n >= 5
  up = ev.evaluate(ev.reference_generator, prompts)
  assert up["score"] == 1.0 and up["triangles"] == {"down": 0.0, "up": 1.0, "n": n}
  assert ev.triangle_orientation(up["results"]) == up["triangles"]
  wrong_way = ev.evaluate(ev.reference_generator, prompts, triangle="down")
  assert all(r["correct"] != ("triangle" in r["prompt"]) for r in wrong_way["results"])
  # from images: only the prompt's triangle colours count; none, or both ways, is neither
  triangle = lambda colour, x, way: {**shapes._object(colour, "triangle", "large", x, 20, 24), "pointing": way}
  red_up, blue_down = shapes.render([triangle("red", 4, "up")]), shapes.render([triangle("blue", 4, "down")])
  both = shapes.render([triangle("red", 4, "up"), triangle("red", 34, "down")])
  cases = [("a red triangle", red_up), ("a blue triangle", blue_down), ("a red triangle", blue_down),
           ("two red triangles", both), ("a red circle", red_up)]
  assert ev.triangle_orientation([{"prompt": p, "detected": ev.detect(im)} for p, im in cases]) == {
      "down": 0.25, "up": 0.25, "n": 4}
  assert ev.triangle_orientation([]) == {"down": None, "up": None, "n": 0}
  with pytest.raises(SanaError):
    ev.score("a red triangle", [], triangle="sideways")


def test_folder_export_shape_filters(tmp_path):
  kept = shapes.export_folder(str(tmp_path / "down"), 8, seed=2, triangle="down", with_shapes=("triangle",))
  assert len(kept) == 8 and kept == sorted(kept) and kept[-1] > 7  # some examples skipped
  assert sorted(p.name for p in (tmp_path / "down").iterdir()) == sorted(
      f"{i:06d}.{e}" for i in kept for e in ("png", "txt"))
  from PIL import Image
  for i in kept:
    image, caption, _ = shapes.generate(i, 2, "train", triangle="down")
    assert (tmp_path / "down" / f"{i:06d}.txt").read_text().strip() == caption and "triangle" in caption
    assert np.array_equal(np.asarray(Image.open(tmp_path / "down" / f"{i:06d}.png")), image)
  rest = shapes.export_folder(str(tmp_path / "rest"), 8, seed=2, without_shapes=("triangle",))
  assert len(rest) == 8 and not set(rest) & set(kept)
  assert all("triangle" not in (tmp_path / "rest" / f"{i:06d}.txt").read_text() for i in rest)
  assert shapes.export_folder(str(tmp_path / "all"), 3, seed=2) == [0, 1, 2]
  for bad in (dict(with_shapes=("hexagon",)), dict(with_shapes=("circle",), without_shapes=("circle",)),
              dict(without_shapes=shapes.SHAPES)):
    with pytest.raises(ValueError):
      shapes.export_folder(str(tmp_path / "bad"), 1, **bad)
  assert not (tmp_path / "bad").exists()


def test_shapes_and_evaluate_cli_triangle_options(tmp_path, capsys):
  out = tmp_path / "data"
  assert shapes.main(["--out", str(out), "--n", "3", "--triangle", "down", "--with-shapes", "triangle"]) == 0
  captions = [p.read_text() for p in out.glob("*.txt")]
  assert len(captions) == 3 and all("triangle" in c for c in captions)
  capsys.readouterr()
  for argv in (["--with-shapes", "hexagon"], ["--triangle", "left"], ["--with-shapes", "circle", "--without-shapes",
                                                                       "circle"]):
    assert shapes.main(["--out", str(tmp_path / "bad"), "--n", "1"] + argv) == 2
    assert capsys.readouterr().err.startswith("error: ")
  report = tmp_path / "eval"
  assert ev.main(["--reference", "--n", "12", "--out", str(report), "--triangle", "down"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["score"] == 1.0 and printed["triangles"]["down"] == 1.0 and printed["triangles"]["n"] > 0
  assert json.loads((report / "report.json").read_text())["settings"]["triangle"] == "down"


def test_controlnet_recipe_placement_check():
  from sana_jax.demo.controlnet_recipe import placed
  hits = 0
  for image, _, objects in examples(40, "validation"):
    assert placed(objects, ev.detect(image), tolerance=1.0)  # the renders themselves: every centre in place
    moved = np.full_like(image, 255)
    moved[:, 6:] = image[:, :-6]  # everything 6 px to the right
    hits += placed(objects, ev.detect(moved), tolerance=4.0)
    recoloured = [dict(o, colour="red" if o["colour"] != "red" else "blue") for o in objects]
    assert not placed(objects, recoloured, 4.0) and placed(objects, recoloured, 4.0, colour=False)
    assert not placed(objects, objects[:-1], 4.0)  # one object missing
  assert hits <= 2  # only objects cut at the border (their visible part's centre moves less) can pass
