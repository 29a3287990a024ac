"""A run's weights as a diffusers `SanaTransformer2DModel` directory (the EMA weights when the run kept
them), for SanaPipeline / diffusers or for fine-tuning with `init_from`; a LoRA run's adapter as
diffusers' LoRA file with --lora (else its adapter fused into the init_from weights); a ControlNet run's
ControlNet as a diffusers `SanaControlNetModel` directory (for SanaControlNetPipeline's controlnet/).

  python -m sana_jax.training.export_model --workdir DIR --out DIR/transformer [--no-ema] [--dtype bfloat16]
  python -m sana_jax.training.export_model --workdir DIR --out DIR/lora --lora   # pytorch_lora_weights.safetensors
  python -m sana_jax.training.export_model --workdir DIR --out DIR/controlnet     # a config.controlnet run

Without --step, the newest checkpoint that restores is exported (a damaged one is skipped with a
warning, and left where it is: export never changes the run's directory). --out appears whole or not
at all.
"""
import os
import sys

from sana_jax import errors, files
from sana_jax.errors import SanaError


def load_run_config(workdir):
  import ml_collections as mlc
  if not os.path.isdir(workdir):
    raise SanaError(f"--workdir {workdir} is not a directory")
  path = os.path.join(workdir, "config.json")
  if not os.path.lexists(path):
    raise SanaError(f"{workdir}: no config.json; not a train.py workdir")
  return mlc.ConfigDict(files.read_json(path, "run config"))


def export_transformer(workdir, out, *, ema=True, dtype="float32", step=None):
  """Writes the checkpoint of `step` (the newest that restores) to `out`: the transformer, or a ControlNet
  run's ControlNet; returns the step written."""
  from flax import nnx
  trainer, step, params = _restore(workdir, ema, step)
  if trainer.lora is not None or trainer.control is not None:
    from sana_jax.training.loop import load_init_params
    trainer.set_frozen(load_init_params(trainer.config, trainer))
  graphdef = trainer.graphdef if trainer.control is None else trainer.control.graphdef
  nnx.merge(graphdef, trainer.model_params(params)).save_pretrained(out, dtype=dtype)
  return step


def export_lora(workdir, out, *, ema=True, dtype="float32", step=None):
  """Writes a LoRA run's adapter as `out`/pytorch_lora_weights.safetensors (diffusers' keys and peft
  config), which diffusers' SanaPipeline.load_lora_weights(out) and ours load; returns the step."""
  import jax

  from sana_jax import dtypes
  trainer, step, params = _restore(workdir, ema, step)
  if trainer.lora is None:
    raise SanaError(f"{workdir}: not a LoRA run (config.lora.rank is 0); export it without --lora")
  trainer.lora.save(out, jax.device_get(params), dtype=dtypes.resolve(dtype))
  return step


def _restore(workdir, ema, step):
  """(trainer on one device, step, the params to export) of the run's checkpoint `step` or newest."""
  import jax

  from sana_jax import parallel
  from sana_jax.training.checkpoint import Checkpointer
  from sana_jax.training.trainer import Trainer
  config = load_run_config(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise SanaError(f"{workdir}: no checkpoints directory; nothing to export")
  trainer = Trainer(config, parallel.make_mesh(data=1, devices=jax.devices()[:1]))
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    if step is None:
      restored = ckpt.restore_latest(trainer.abstract_state(), move_aside=False)
      if restored is None:
        raise SanaError(f"{workdir}: no checkpoint to export" + (" that restores" if ckpt.damaged_steps else ""))
      step, state, _ = restored
    else:
      state, _ = ckpt.restore(trainer.abstract_state(), step)
  finally:
    ckpt.close()
  return trainer, step, state.ema if ema and state.ema is not None else state.params


@errors.cli_main
def main(argv=None):
  p = errors.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--no-ema", action="store_true", help="the raw weights even when the run kept an EMA")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--lora", action="store_true", help="a LoRA run's adapter as diffusers' LoRA file")
  args = p.parse_args(argv)
  if os.path.lexists(args.out) and not os.path.isdir(args.out):
    raise SanaError(f"--out {args.out} exists and is not a directory")
  export = export_lora if args.lora else export_transformer
  step = export(args.workdir, args.out, ema=not args.no_ema, dtype=args.dtype, step=args.step)
  print(f"wrote step {step} to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
