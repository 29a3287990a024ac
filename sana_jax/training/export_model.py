"""A run's weights as a diffusers `SanaTransformer2DModel` directory (the EMA weights when the run kept
them), for SanaPipeline / diffusers or for fine-tuning with `init_from`.

  python -m sana_jax.training.export_model --workdir DIR --out DIR/transformer [--no-ema] [--dtype bfloat16]
"""
import argparse
import json
import os
import sys

from sana_jax.errors import SanaError, cli_main


def load_run_config(workdir):
  import ml_collections as mlc
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise SanaError(f"{workdir}: no config.json; not a train.py workdir")
  with open(path) as f:
    return mlc.ConfigDict(json.load(f))


def export_transformer(workdir, out, *, ema=True, dtype="float32", step=None):
  """Writes the checkpoint of `step` (the latest) to `out`; returns the step written."""
  import jax
  from flax import nnx

  from sana_jax import parallel
  from sana_jax.training.checkpoint import Checkpointer
  from sana_jax.training.trainer import Trainer
  config = load_run_config(workdir)
  trainer = Trainer(config, parallel.make_mesh(data=1, devices=jax.devices()[:1]))
  ckpt = Checkpointer(workdir)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise SanaError(f"{workdir}: no checkpoint to export")
  state, _ = ckpt.restore(trainer.abstract_state(), step)
  ckpt.close()
  params = state.ema if ema and state.ema is not None else state.params
  nnx.merge(trainer.graphdef, params).save_pretrained(out, dtype=dtype)
  return step


@cli_main
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--no-ema", action="store_true", help="the raw weights even when the run kept an EMA")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--step", type=int, default=None)
  args = p.parse_args(argv)
  step = export_transformer(args.workdir, args.out, ema=not args.no_ema, dtype=args.dtype, step=args.step)
  print(f"wrote step {step} to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
