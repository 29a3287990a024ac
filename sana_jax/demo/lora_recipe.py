"""The LoRA proof on the shipped demo model: a LoRA trained from 32 images makes triangles point down.

  python -m sana_jax.demo.lora_recipe --work /tmp/shapes-lora

1. data: --triangles images of triangle prompts drawn pointing down, plus --others images of prompts
   without triangles (drawn as always, so circles and squares stay as they are), with their captions;
   precomputed with the shipped model's DC-AE and text encoder
2. train: train.py with configs/demo_shapes.py fine-tuning the shipped transformer through a LoRA
3. export: the adapter as a diffusers LoRA file (export_model --lora)
4. eval: the alignment evaluation of the shipped model with and without the LoRA on the same prompts;
   WORK/report.json holds, for each, the share of triangle prompts whose triangles all point down
   (or up), and the score on the prompts without triangles

Each stage writes WORK/<stage> and is skipped when that exists, so an interrupted run resumes.
"""
import json
import os
import shutil
import sys

from sana_jax import files
from sana_jax.demo.stages import ASSET, run_stages, train_demo
from sana_jax.errors import ArgumentParser, SanaError, cli_main

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point")


def stage_data(out, a):
  from sana_jax.data import precompute
  from sana_jax.demo import shapes
  images = os.path.join(a.work, "images")
  shutil.rmtree(images, ignore_errors=True)
  for prefix, n, kw in (("t", a.triangles, dict(triangle="down", with_shapes=("triangle",))),
                        ("o", a.others, dict(without_shapes=("triangle",)))):
    part = os.path.join(a.work, f"images-{prefix}")
    shutil.rmtree(part, ignore_errors=True)
    shapes.export_folder(part, n, a.seed + (prefix == "o"), **kw)
    os.makedirs(images, exist_ok=True)
    for name in os.listdir(part):
      os.replace(os.path.join(part, name), os.path.join(images, f"{prefix}_{name}"))
    os.rmdir(part)
  code = precompute.main(["--images", images, "--model", a.model, "--out", out, "--resolution", "64", "--square",
                          "--batch-size", "32", "--max-sequence-length", "16"])
  if code:
    raise SanaError("precompute failed (its message is above)")
  return dict(images=a.triangles + a.others)


def stage_train(out, a):
  flags = (f"--config.lora.rank={a.rank}", f"--config.lora.alpha={float(a.rank)}", f"--config.lora.targets={TARGETS!r}")
  return train_demo(out, latents=os.path.join(a.work, "data"), init_from=os.path.join(a.model, "transformer"),
                    steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, flags=flags)


def stage_export(out, a):
  from sana_jax.training.export_model import export_lora
  return dict(step=export_lora(os.path.join(a.work, "train"), out))


def stage_eval(out, a):
  from sana_jax.demo import evaluate
  report = {}
  for name, extra in (("base", []), ("lora", ["--lora", os.path.join(a.work, "export"), "--triangle", "down"])):
    where = os.path.join(out, name)
    if evaluate.main(["--model", a.model, "--n", str(a.eval_prompts), "--out", where, "--prompt-seed", "1234",
                      *extra]):
      raise SanaError("the evaluation failed")
    with open(os.path.join(where, "report.json")) as f:
      full = json.load(f)
    results = full["results"]
    others = [r["score"] for r in results if "triangle" not in r["prompt"]]
    by = lambda keep, results=results: evaluate.triangle_orientation([r for r in results if keep(r)])
    report[name] = dict(
        triangles=full["triangles"], score=full["score"], prompts_without_triangles=len(others),
        score_without_triangles=round(sum(others) / len(others), 4),
        triangles_by_category={c: by(lambda r, c=c: r["category"] == c) for c in evaluate.CATEGORIES},
        triangles_seen_pairs=by(lambda r: not r["heldout"]), triangles_held_out_pairs=by(lambda r: r["heldout"]))
  return report


@cli_main
def main(argv=None):
  p = ArgumentParser(prog="python -m sana_jax.demo.lora_recipe", description=__doc__.splitlines()[0])
  p.add_argument("--work", required=True)
  p.add_argument("--model", default=ASSET, help="the demo pipeline directory (default: the shipped one)")
  p.add_argument("--triangles", type=int, default=16, help="images of triangle prompts, triangles drawn down")
  p.add_argument("--others", type=int, default=16, help="images of prompts without triangles")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-prompts", type=int, default=200)
  a = p.parse_args(argv)
  if a.triangles < 1 or a.others < 0 or a.triangles + a.others > 32:
    raise SanaError("--triangles (>= 1) and --others (>= 0) add up to at most 32 images")
  files.output_directory(a.work, "--work")
  stages = [(name, lambda out, run=run: run(out, a)) for name, run in
            (("data", stage_data), ("train", stage_train), ("export", stage_export), ("eval", stage_eval))]
  run_stages(a.work, "report.json", stages, "lora recipe", settings={k: v for k, v in vars(a).items() if k != "work"})
  print(f"[lora recipe] done: {os.path.join(a.work, 'report.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
