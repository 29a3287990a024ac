"""The ControlNet proof on the shipped demo model: a ControlNet trained on edge maps puts the shapes where
the map draws them.

  python -m sana_jax.demo.controlnet_recipe --work /tmp/shapes-controlnet

1. data: --images shapes images with their captions, precomputed with the shipped model's DC-AE and text
   encoder, each with its edge map's latents as the condition (precompute --control edge)
2. train: train.py with configs/demo_shapes.py and config.controlnet, steering the shipped transformer
3. export: the ControlNet with the shipped model as a SanaControlNetPipeline directory (WORK/export;
   `sample.py --model WORK/export --control-image IMG --control-type edge` uses it)
4. eval: for --eval-prompts validation examples (layouts never trained on), the edge map of the example's
   own image is the control and its caption the prompt; the shape detector finds the generated objects.
   "placed": every object of the example has a detected object of its shape whose centre is within
   --tolerance px of its own (one to one): what the edge map draws; "placed_in_colour": of its shape and
   colour, which the caption alone gives. Scored for the ControlNet, for the same pipeline at
   conditioning scale 0 and for the shipped model alone (same prompts and seeds), with the prompt score of
   `demo.evaluate`; WORK/report.json holds them, WORK/eval/grid.png shows target, control and both outputs.

Each stage writes WORK/<stage> and is skipped when that exists, so an interrupted run resumes.
"""
import itertools
import os
import sys

import numpy as np

from sana_jax import files
from sana_jax.demo.stages import ASSET, run_stages, train_demo
from sana_jax.errors import ArgumentParser, SanaError, cli_main


def stage_data(out, a):
  from sana_jax.data import precompute
  from sana_jax.demo import shapes
  images = os.path.join(a.work, "images")
  if not os.path.isdir(images):
    shapes.export_folder(images + ".partial", a.images, a.seed)
    os.replace(images + ".partial", images)
  code = precompute.main(["--images", images, "--model", a.model, "--out", out, "--resolution", "64", "--square",
                          "--batch-size", "64", "--max-sequence-length", "16", "--control", "edge"])
  if code:
    raise SanaError("precompute failed (its message is above)")
  return dict(images=a.images)


def stage_train(out, a):
  return train_demo(out, latents=os.path.join(a.work, "data"), init_from=os.path.join(a.model, "transformer"),
                    steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed,
                    flags=(f"--config.controlnet.num_layers={a.layers}",))


def stage_export(out, a):
  from sana_jax.models.controlnet import SanaControlNetModel
  from sana_jax.pipeline import SanaControlNetPipeline, SanaPipeline
  from sana_jax.training.export_model import export_transformer
  controlnet_dir = os.path.join(a.work, "controlnet")
  step = export_transformer(os.path.join(a.work, "train"), controlnet_dir)
  pipe = SanaControlNetPipeline(**SanaPipeline.components_from_pretrained(a.model),
                                controlnet=SanaControlNetModel.from_pretrained(controlnet_dir))
  pipe.save_pretrained(out)
  return dict(step=step)


def placed(targets, detected, tolerance, colour=True):
  """Whether every target object has its own detected object of the same shape (and colour), centres at
  most `tolerance` px apart (the best one-to-one assignment; at most three objects)."""
  def fits(t, d):
    same = t["shape"] == d["shape"] and (not colour or t["colour"] == d["colour"])
    return same and np.hypot(t["centre"][0] - d["centre"][0], t["centre"][1] - d["centre"][1]) <= tolerance
  return any(all(fits(t, d) for t, d in zip(targets, chosen))
             for chosen in itertools.permutations(detected, len(targets)))


def stage_eval(out, a):
  from sana_jax.controls import edge_map
  from sana_jax.demo import evaluate, shapes
  from sana_jax.pipeline import SanaPipeline, load_pipeline
  examples = [shapes.generate(i, a.seed + 1, "validation") for i in range(a.eval_prompts)]
  controls = np.stack([edge_map(image / 255.0) for image, _, _ in examples])
  controlnet, base = load_pipeline(os.path.join(a.work, "export")), SanaPipeline.from_pretrained(a.model)
  kw = dict(num_inference_steps=a.eval_steps, output_type="np")
  runs = {"controlnet": lambda p, s, c: controlnet(p, control_image=c, seed=s, **kw).images,
          "scale_0": lambda p, s, c: controlnet(p, control_image=c, controlnet_conditioning_scale=0.0, seed=s,
                                                **kw).images,
          "base": lambda p, s, c: base(p, seed=s, **kw).images}
  images, report = {}, {}
  for name, run in runs.items():
    images[name] = []
    for start in range(0, len(examples), 32):
      prompts = [text for _, text, _ in examples[start:start + 32]]
      images[name] += evaluate.to_uint8(run(prompts, a.seed + start, controls[start:start + 32]))
    rows = []
    for (_, text, objects), image in zip(examples, images[name]):
      detected = evaluate.detect(image)
      rows.append(dict(category=evaluate.parse_prompt(text).category, score=evaluate.score(text, detected)["score"],
                       placed=placed(objects, detected, a.tolerance, colour=False),
                       placed_in_colour=placed(objects, detected, a.tolerance)))
    mean = lambda key, rs: round(float(np.mean([r[key] for r in rs])), 4)
    report[name] = {key: mean(key, rows) for key in ("placed", "placed_in_colour", "score")}
    for key in ("placed", "placed_in_colour"):
      report[name][f"{key}_by_category"] = {c: mean(key, [r for r in rows if r["category"] == c])
                                            for c in evaluate.CATEGORIES}
  report["scale_0_images_equal_base"] = bool(all(np.array_equal(x, y) for x, y in zip(images["scale_0"],
                                                                                       images["base"])))
  report["n"], report["tolerance_px"] = len(examples), a.tolerance
  os.makedirs(out, exist_ok=True)
  shown = min(16, len(examples))
  grid = [im for i in range(shown) for im in (examples[i][0], evaluate.to_uint8(controls[i:i + 1])[0],
                                                 images["controlnet"][i], images["base"][i])]
  labels = [label for i in range(shown) for label in (examples[i][1], "edge map", "ControlNet", "base")]
  evaluate.write_grid(os.path.join(out, "grid.png"), grid, labels, cols=8)
  return report


@cli_main
def main(argv=None):
  p = ArgumentParser(prog="python -m sana_jax.demo.controlnet_recipe", description=__doc__.splitlines()[0])
  p.add_argument("--work", required=True)
  p.add_argument("--model", default=ASSET, help="the demo pipeline directory (default: the shipped one)")
  p.add_argument("--images", type=int, default=8192, help="training images (with their edge maps)")
  p.add_argument("--layers", type=int, default=4, help="ControlNet blocks (copies of the base's first ones)")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-prompts", type=int, default=200)
  p.add_argument("--eval-steps", type=int, default=20)
  p.add_argument("--tolerance", type=float, default=4.0, help="px between a target's and its object's centres")
  a = p.parse_args(argv)
  if a.images < a.batch or not 1 <= a.layers <= 7 or a.steps < 1 or a.eval_prompts < 1 or a.tolerance <= 0:
    raise SanaError("expected --images >= --batch, --layers 1 to 7, --steps >= 1, --eval-prompts >= 1, "
                    "--tolerance > 0")
  files.output_directory(a.work, "--work")
  stages = [(name, lambda out, run=run: run(out, a)) for name, run in
            (("data", stage_data), ("train", stage_train), ("export", stage_export), ("eval", stage_eval))]
  run_stages(a.work, "report.json", stages, "controlnet recipe",
             settings={k: v for k, v in vars(a).items() if k != "work"})
  print(f"[controlnet recipe] done: {os.path.join(a.work, 'report.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
