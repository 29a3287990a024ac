"""The demo model's whole recipe, from nothing to a shipped diffusers-format pipeline:

  python -m sana_jax.demo.recipe --work /tmp/shapes [--ship sana_jax/assets/sana-shapes]

1. text: a word-level tokenizer and a tiny Gemma-2, pretrained as a causal LM on the captions
2. vae: a tiny DC-AE (three downsamplings: 64 px -> 8x8 latents) trained on shapes images
3. data: shapes images -> DC-AE latents + text embeddings (sana_jax.data.precompute), train/validation
4. dit: train.py with configs/demo_shapes.py on those latents
5. ship: the pipeline (DiT EMA weights) saved in diffusers' format, then the alignment evaluation

Each stage writes WORK/<stage> and is skipped when that exists, so an interrupted recipe resumes.
Wall times go to WORK/recipe.json. The demo encodes prompts without the complex human instruction
and with at most 16 tokens (stored in the pipeline's model_index.json).
"""
import json
import os
import subprocess
import sys

from sana_jax import files
from sana_jax.convert import writing
from sana_jax.demo.stages import ROOT, run_stages
from sana_jax.errors import ArgumentParser, SanaError, cli_main

TEXT_SETTINGS = dict(max_sequence_length=16, complex_human_instruction=())
FLOW_SHIFT = 1.0


def stage_text(out, a):
  from sana_jax.demo import text_encoder as te
  captions = te.shapes_captions(a.captions, a.seed)
  tokenizer = te.build_tokenizer(captions, os.path.join(out, "tokenizer"))
  encoder = te.init_text_encoder(a.seed, len(tokenizer))
  encoder, metrics = te.pretrain_lm(encoder, tokenizer, captions, a.lm_steps, chi=(), seed=a.seed,
                                    side_targets=a.side_targets)
  encoder.save_pretrained(os.path.join(out, "text_encoder"))
  return dict(vocab_size=len(tokenizer), lm_loss_before=metrics["loss_before"], lm_loss_after=metrics["loss_after"])


def stage_vae(out, a):
  from sana_jax.demo import train_dcae as td
  train = td.shapes_images(a.vae_images, a.seed, "train")
  held = td.shapes_images(256, a.seed, "validation")
  model, scale, metrics = td.train_dcae(train, a.vae_steps, config=td.tiny_dcae_config(a.latent_channels),
                                        seed=a.seed, eval_images=held)
  model.save_pretrained(os.path.join(out, "vae"))
  return dict(psnr_db=metrics["eval_psnr_db"], scaling_factor=scale)


def stage_data(out, a, work):
  from sana_jax.data import precompute
  from sana_jax.demo import shapes
  parts = os.path.join(work, "parts")
  # the prompt settings precompute reads
  files.write_json(os.path.join(parts, "model_index.json"),
                   {"sana_jax": {k: list(v) if isinstance(v, tuple) else v for k, v in TEXT_SETTINGS.items()}})
  counts = {}
  for split, n in (("train", a.images), ("validation", 512)):
    folder = os.path.join(work, "images", split)
    shapes.export_folder(folder, n, a.seed, split)
    code = precompute.main(["--images", folder, "--model", parts, "--out", os.path.join(out, split),
                            "--resolution", "64", "--square", "--batch-size", "64",
                            "--max-sequence-length", str(TEXT_SETTINGS["max_sequence_length"])])
    if code:
      raise SanaError(f"precompute failed for {split} (its message is above)")
    counts[split] = n
  return counts


def stage_dit(out, a, work):
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, f"configs/demo_shapes.py:latents={os.path.join(work, 'data')},steps={a.dit_steps},"
                            f"channels={a.latent_channels},batch={a.batch},layers={a.layers}"),
         "--workdir", out]
  if subprocess.run(cmd, cwd=ROOT).returncode:
    raise SanaError("train.py failed (its message is above)")
  with open(os.path.join(out, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  return dict(last_metrics=last)


def stage_ship(out, a, work):
  import sana_jax
  from sana_jax.convert import pipelines
  from sana_jax.training.export_model import export_transformer
  parts = os.path.join(work, "parts")
  export_transformer(os.path.join(work, "dit"), os.path.join(parts, "transformer"))
  pipelines.save_pipeline(out, transformer=sana_jax.SanaTransformer.from_pretrained(os.path.join(parts, "transformer")),
                          vae=sana_jax.DCAE.from_pretrained(os.path.join(parts, "vae")),
                          text_encoder=sana_jax.GemmaTextEncoder.from_pretrained(os.path.join(parts, "text_encoder")),
                          tokenizer=os.path.join(parts, "tokenizer"), flow_shift=FLOW_SHIFT, settings=TEXT_SETTINGS)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
  return dict(megabytes=round(size / 1e6, 2))


def stage_eval(out, a, work):
  from sana_jax.demo import evaluate
  code = evaluate.main(["--model", os.path.join(work, "ship"), "--n", str(a.eval_prompts), "--out", out,
                        "--steps", "20", "--cfg", str(a.cfg), "--prompt-seed", "1234"])
  if code:
    raise SanaError("the evaluation stage failed")
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  return {k: v for k, v in report.items() if not isinstance(v, list)}


@cli_main
def main(argv=None):
  p = ArgumentParser(prog="python -m sana_jax.demo.recipe", description=__doc__.splitlines()[0])
  p.add_argument("--work", required=True)
  p.add_argument("--ship", default=None, help="also copy the finished pipeline here (e.g. sana_jax/assets/sana-shapes)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--captions", type=int, default=8192)
  p.add_argument("--lm-steps", type=int, default=300)
  p.add_argument("--side-targets", action="store_true", help="pretrain the text encoder with side targets "
                 "(sana_jax.demo.text_encoder.caption_arrays); the shipped model predates them")
  p.add_argument("--vae-steps", type=int, default=2500)
  p.add_argument("--vae-images", type=int, default=8192)
  p.add_argument("--latent-channels", type=int, default=16)
  p.add_argument("--images", type=int, default=20000)
  p.add_argument("--dit-steps", type=int, default=3000)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--cfg", type=float, default=4.5)
  p.add_argument("--eval-prompts", type=int, default=200)
  p.add_argument("--stop-after", default=None, choices=("parts/tokenizer", "parts/vae", "data", "dit", "ship", "eval"),
                 help="the last stage to run (e.g. data, to train elsewhere)")
  a = p.parse_args(argv)
  files.output_directory(a.work, "--work")
  stages = [("parts/tokenizer", lambda o: stage_text(os.path.join(a.work, "parts"), a)),
            ("parts/vae", lambda o: stage_vae(os.path.join(a.work, "parts"), a)),
            ("data", lambda o: stage_data(o, a, a.work)),
            ("dit", lambda o: stage_dit(o, a, a.work)),
            ("ship", lambda o: stage_ship(o, a, a.work)),
            ("eval", lambda o: stage_eval(o, a, a.work))]
  log = run_stages(a.work, "recipe.json", stages, "recipe", stop_after=a.stop_after)
  log_path = os.path.join(a.work, "recipe.json")
  log["total_seconds"] = round(sum(v.get("seconds", 0) for v in log.values() if isinstance(v, dict)), 1)
  files.write_json(log_path, log, indent=1)
  if a.ship:
    import shutil
    with files.atomic_directory(a.ship, writing.holds_saved_model) as tmp:
      shutil.copytree(os.path.join(a.work, "ship"), tmp, dirs_exist_ok=True)
  print(f"[recipe] done in {log['total_seconds'] / 60:.1f} min: {log_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
