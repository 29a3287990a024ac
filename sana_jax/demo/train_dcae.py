"""Trains the shapes demo's tiny DC-AE: 64 px images <-> 8 x 8 latents (f8), on CPU in minutes.

    python -m sana_jax.demo.train_dcae --out DIR --steps 2500

writes DIR/vae/ (a diffusers `AutoencoderDC` directory; config.json carries the measured
`scaling_factor`) and DIR/dcae_metrics.json. In code:

    model, scaling_factor, metrics = train_dcae(images_uint8, steps=2500)

The architecture is the released DC-AE's, shrunk: no blocks at full resolution (the input is
pixel-unshuffled straight to 32 px, as the f32c32-in/mix models do), ResBlock stages at 32, 16 and 8 px.
Flat colours and hard edges need no perceptual or adversarial loss: L1 + MSE reach 30 dB alone.
"""
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sana_jax import files
from sana_jax.errors import ArgumentParser, cli_main
from sana_jax.models.dcae import DCAE, DCAEConfig


def tiny_dcae_config(latent_channels=16, widths=(32, 32, 64, 128), encoder_layers=(0, 1, 1, 2),
                     decoder_layers=(0, 1, 1, 2)):
  """Four stages = three halvings (64 px -> 8 px); stage 0 has no blocks, so its conv works on the
  unshuffled input (a quarter of the full-resolution cost)."""
  n = len(widths)
  return DCAEConfig(
      latent_channels=latent_channels, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
      encoder_block_out_channels=tuple(widths), decoder_block_out_channels=tuple(widths),
      encoder_layers_per_block=tuple(encoder_layers), decoder_layers_per_block=tuple(decoder_layers),
      encoder_qkv_multiscales=((),) * n, decoder_qkv_multiscales=((),) * n,
      downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
      decoder_norm_types="rms_norm", decoder_act_fns="silu").validated()


def to_model_range(images):
  """uint8 [B, H, W, 3] (or floats already in [-1, 1]) -> float32 in [-1, 1]."""
  images = np.asarray(images)
  return images.astype(np.float32) / 127.5 - 1.0 if images.dtype == np.uint8 else images.astype(np.float32)


def psnr(reference, reconstruction):
  """Mean PSNR in dB over a batch, images in [-1, 1] (clipped: what the pipeline shows)."""
  a = (np.asarray(reference, np.float64) + 1) / 2
  b = np.clip((np.asarray(reconstruction, np.float64) + 1) / 2, 0, 1)
  mse = np.maximum(((a - b) ** 2).reshape(len(a), -1).mean(axis=1), 1e-12)
  return float(np.mean(10 * np.log10(1.0 / mse)))


def reconstruction_loss(model, x):
  """L1 keeps edges sharp; MSE is what PSNR measures."""
  err = model.decode(model.encode(x)).astype(jnp.float32) - x
  return jnp.mean(jnp.abs(err)) + jnp.mean(jnp.square(err))


def make_optimizer(steps, lr, warmup, params=None, decoder_only=False):
  """AdamW on a warmup-cosine schedule; with `decoder_only` the encoder's updates are zero (pass `params`
  for the labels), so the latent space a trained DiT relies on stays exactly where it is."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps - 1, 1)), max(steps, 2), lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.99, weight_decay=1e-4))
  if not decoder_only:
    return tx
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if getattr(path[0], "key", None) == "encoder" else "trained", params)
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def make_train_step(graphdef, tx):
  """One jitted step on pure state: (params, opt_state, x) -> (params, opt_state, loss)."""
  def step(params, opt_state, x):
    loss, grads = jax.value_and_grad(lambda p: reconstruction_loss(nnx.merge(graphdef, p), x))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def batches(images, batch_size, seed):
  """Random batches (with flips: shapes stay shapes) from an array, or an iterator's items as given."""
  if not isinstance(images, np.ndarray):
    yield from (to_model_range(b) for b in images)
    return
  rng = np.random.default_rng(seed)
  while True:
    x = to_model_range(images[rng.integers(len(images), size=batch_size)])
    if rng.integers(2):
      x = x[:, :, ::-1]
    yield np.ascontiguousarray(x)


def apply_batched(fn, x, batch_size=64):
  return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + batch_size]))) for i in range(0, len(x), batch_size)])


def latent_scaling_factor(model, images):
  """1 / std of the latents over `images`: latents * factor reach the DiT with unit variance."""
  z = apply_batched(model._pure("encode"), to_model_range(images))
  return float(1.0 / z.std())


def evaluate(model, images):
  x = to_model_range(images)
  encode, decode = model._pure("encode"), model._pure("decode")
  return psnr(x, apply_batched(lambda b: decode(encode(b)), x))


def train_dcae(images, steps, *, config=None, model=None, batch_size=32, lr=2e-3, warmup=100, seed=0,
               eval_images=None, log_every=100, log=None, decoder_only=False):
  """Trains a DC-AE (`model`, or a new one of `config`) on uint8 [N, 64, 64, 3] images (or an
  iterator of batches), logging through `log` (default: print); `decoder_only` fine-tunes the
  decoder of a trained `model` and keeps its encoder and scaling factor (the latents a DiT was
  trained on do not move).

  Returns (model with config.scaling_factor set, scaling_factor, metrics): metrics hold the loss
  curve (every `log_every` steps), wall time, and PSNR on `eval_images` when given. The
  scaling factor is measured on the first 512 images (an iterator: on its first batch).
  """
  if decoder_only and model is None:
    raise ValueError("decoder_only fine-tunes a trained model: pass `model`")
  log = log or functools.partial(print, flush=True)
  model = model or DCAE(config or tiny_dcae_config(), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  tx = make_optimizer(steps, lr, warmup, params, decoder_only)
  opt_state = tx.init(params)
  step = make_train_step(graphdef, tx)
  data = batches(images, batch_size, seed)
  losses, start, first = [], time.time(), None
  for i in range(steps):
    x = next(data)
    first = x if first is None else first
    params, opt_state, loss = step(params, opt_state, jnp.asarray(x))
    if i % log_every == 0 or i == steps - 1:
      losses.append((i, float(loss)))
      log(f"step {i:5d}  loss {float(loss):.5f}  {time.time() - start:6.1f} s")
  model = nnx.merge(graphdef, params)
  metrics = dict(steps=steps, batch_size=batch_size, train_seconds=time.time() - start, losses=losses,
                 num_params=int(sum(p.size for p in jax.tree.leaves(params))))
  sample = images[:512] if isinstance(images, np.ndarray) else first  # an iterator: its first batch
  scaling_factor = model.config.scaling_factor if decoder_only else latent_scaling_factor(model, sample)
  model.config = dataclasses.replace(model.config, scaling_factor=scaling_factor)
  if eval_images is not None:
    metrics["eval_psnr_db"] = evaluate(model, eval_images)
  metrics["scaling_factor"] = scaling_factor
  return model, scaling_factor, metrics


def shapes_images(n, seed=0, split="train"):
  from sana_jax.demo import shapes  # the generator, only when the CLI runs
  return np.stack([shapes.generate(i, seed, split)[0] for i in range(n)])


@cli_main
def main(argv=None):
  p = ArgumentParser(prog="python -m sana_jax.demo.train_dcae", description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="output directory; the model goes to OUT/vae")
  p.add_argument("--steps", type=int, default=2500)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--latent-channels", type=int, default=16)
  p.add_argument("--train-images", type=int, default=8192)
  p.add_argument("--eval-images", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--resume", help="a saved vae/ directory to continue training from")
  p.add_argument("--decoder-only", action="store_true",
                 help="with --resume: train only the decoder (the encoder, its latents and scaling factor stay)")
  args = p.parse_args(argv)
  files.output_directory(args.out, "--out")
  if args.decoder_only and not args.resume:
    p.error("--decoder-only needs --resume DIR (a trained vae/ directory)")
  train = shapes_images(args.train_images, args.seed, "train")
  held = shapes_images(args.eval_images, args.seed, "validation")
  start = DCAE.from_pretrained(args.resume) if args.resume else None
  model, scaling_factor, metrics = train_dcae(train, args.steps, config=tiny_dcae_config(args.latent_channels),
                                              model=start, warmup=10 if start else 100,
                                              batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                              eval_images=held, decoder_only=args.decoder_only)
  model.save_pretrained(os.path.join(args.out, "vae"))
  files.write_json(os.path.join(args.out, "dcae_metrics.json"), metrics, indent=1)
  print(f"validation PSNR {metrics['eval_psnr_db']:.2f} dB, scaling_factor {scaling_factor:.4f}, "
        f"{metrics['train_seconds']:.0f} s; saved {os.path.join(args.out, 'vae')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
