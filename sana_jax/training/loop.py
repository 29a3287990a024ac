"""The training loop: one readable function, `train(config, workdir)`.

config checks -> data -> global arrays -> jitted step -> (log, validate, sample, checkpoint). A run
resumes from the newest checkpoint in its workdir that restores (a damaged one is moved aside, see
checkpoint.py), saves on SIGTERM (preemption) and on its last step, and stops with a clear error when
the loss stays non-finite.
"""
import json
import os
import signal
import threading
import time

import jax
import numpy as np

from sana_jax import files, parallel
from sana_jax.errors import SanaError
from sana_jax.training import config_checks, controlnet, plan
from sana_jax.training.checkpoint import Checkpointer
from sana_jax.training.runlog import RunLog, warn
from sana_jax.training.trainer import Trainer


def train(config, workdir):
  config_checks.check(config, workdir)  # before anything is built: a bad value costs a second
  from sana_jax import data
  mesh = parallel.mesh_from_config(config.mesh)
  rules = parallel.rules_from_config(config.get("sharding_rules"))
  split = mesh.shape["data"] * mesh.shape["fsdp"] * config.get("grad_accum", 1)
  if config.batch_size % split:
    raise SanaError(f"config.batch_size={config.batch_size} does not split over data x fsdp = "
                    f"{mesh.shape['data'] * mesh.shape['fsdp']} devices times config.grad_accum="
                    f"{config.get('grad_accum', 1)}; make it a multiple of {split}")
  trainer = Trainer(config, mesh, rules)
  batches = data.make_train_iterator(data_config(config), global_batch=config.batch_size,
                                     process_index=jax.process_index(), process_count=jax.process_count(),
                                     seed=config.seed, split="train")
  null_text = tuple(np.asarray(a) for a in trainer.null_text(config.data))
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=config.get("async_checkpoints", True))
  log = stop = None
  try:
    if trainer.lora is not None or trainer.control is not None:  # the frozen base: from init_from on every start
      trainer.set_frozen(load_init_params(config, trainer))
    restored = ckpt.restore_latest(trainer.abstract_state())
    if restored is not None:
      start, state, data_state = restored
      batches.set_state(data_state)
    else:
      if ckpt.damaged_steps:
        warn(f"no checkpoint in {ckpt.directory} restores; starting the run afresh")
      start = 0
      if trainer.control is not None:
        state = trainer.state_from_params(trainer.control.from_base(trainer.frozen))
      elif config.get("init_from") and trainer.lora is None:
        state = trainer.state_from_params(load_init_params(config, trainer))
      else:
        state = trainer.init()
    if jax.process_index() == 0:
      files.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))

    log = RunLog(workdir, total_steps=config.total_steps, start_step=start)
    validate = Validation(config, trainer) if config.eval.every else None
    samples = SampleWriter(config, trainer, log, workdir) if config.sample.every else None
    stop = PreemptionFlag()
    step, last_time, last_step = start, time.perf_counter(), start
    while step < config.total_steps:
      batch = trainer.put_batch(next(batches))
      if step == start:  # a step that cannot fit fails here in one line, not as an out-of-memory error; not on CPU
        plan.check_step_fits(trainer, state, batch, null_text)
      state, metrics = trainer.step(state, batch, null_text)
      step += 1
      log.advance()
      if step % config.log_every == 0 or step == config.total_steps:
        metrics, nonfinite = jax.device_get((metrics, state.nonfinite))
        now = time.perf_counter()
        step_time = (now - last_time) / (step - last_step)
        last_time, last_step = now, step
        log.write(step, dict(metrics, step_time=step_time, examples_per_sec=config.batch_size / step_time,
                             skipped_steps=int(jax.device_get(state.skipped)),
                             bad_examples=data.skipped_count(batches)))
        if nonfinite >= config.max_nonfinite_steps:
          raise SanaError(f"loss or gradients non-finite for {int(nonfinite)} steps in a row at step {step}; "
                          f"stopped, the last checkpoint ({ckpt.latest_step()}) holds the last good state")
      if validate and step % config.eval.every == 0:
        log.write(step, validate(state))
      if samples and step % config.sample.every == 0:
        samples(state, step)
      preempted = stop.is_set()
      if step % config.checkpoint_every == 0 or step == config.total_steps or preempted:
        ckpt.save(step, state, batches.get_state(), config)
      if preempted:
        print(f"SIGTERM: saved step {step}; exiting to resume later", flush=True)
        break
  finally:
    ckpt.close()  # joins the in-flight save: a checkpoint is never left half-written by us
    if log is not None:
      log.close()
    if stop is not None:
      stop.restore()
  return state


def data_config(config):
  """The run's data config; a ControlNet run's batches carry condition latents (data.control)."""
  if controlnet.enabled(config):
    return {**config.data.to_dict(), "control": True}
  return config.data


def load_init_params(config, trainer):
  """Float32 params of a diffusers SanaTransformer2DModel directory, for fine-tuning."""
  from flax import nnx

  from sana_jax.models.dit import SanaTransformer
  model = SanaTransformer.from_pretrained(config.init_from, dtype=np.float32, mesh=trainer.mesh, rules=trainer.rules)
  params = nnx.to_pure_dict(nnx.state(model))
  want = jax.tree.map(lambda a: a.shape, trainer.base_abstract)
  got = jax.tree.map(lambda a: a.shape, params)
  if want != got:
    raise SanaError(f"init_from={config.init_from}: its transformer does not match config.model "
                    f"(compare its config.json with the run's model block)")
  return params


class Validation:
  """Loss at fixed sigmas on the first `eval.batches` batches of the held-out split."""

  def __init__(self, config, trainer):
    from sana_jax import data
    self.trainer, self.sigmas = trainer, tuple(config.eval.sigmas)
    it = data.make_train_iterator(data_config(config), global_batch=config.batch_size,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  seed=config.seed, split="validation")
    self.batches = [trainer.put_batch(next(it)) for _ in range(config.eval.batches)]

  def __call__(self, state):
    out = {}
    for sigma in self.sigmas:
      losses = [self.trainer.eval_loss(state.params, b, sigma) for b in self.batches]
      out[f"val_loss@{sigma:g}"] = float(np.mean(jax.device_get(losses)))
    out["val_loss"] = float(np.mean(list(out.values())))
    return out


class SampleWriter:
  """Preview images: PNGs of fixed prompts every `sample.every` steps (DIR/samples/stepNNNNNNN_i.png
  and TensorBoard), from the EMA params when kept.

  The text encoder, tokenizer and DC-AE come from `sample.model_dir` (a diffusers-format directory);
  the transformer is the one being trained.
  """

  def __init__(self, config, trainer, log, workdir):
    from sana_jax.pipeline import SanaPipeline
    c = config.sample  # config_checks.check made sure model_dir is set
    self.components = SanaPipeline.components_from_pretrained(c.model_dir, transformer=False)
    self.trainer, self.pipe = trainer, None
    self.config, self.log, self.dir = c, log, os.path.join(workdir, "samples")

  def __call__(self, state, step):
    from jax.experimental import multihost_utils
    params = self.trainer.model_params(state.ema if state.ema is not None else state.params)
    params = multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1 else params
    if jax.process_index() != 0:
      return
    if self.pipe is None:
      from flax import nnx

      from sana_jax.pipeline import SanaPipeline
      transformer = nnx.merge(self.trainer.graphdef, params)
      self.pipe = SanaPipeline(**self.components, transformer=transformer)
    else:
      self.pipe.set_transformer_params(params)
    out = self.pipe(list(self.config.prompts), num_inference_steps=self.config.steps,
                    guidance_scale=self.config.guidance_scale, seed=self.config.seed, output_type="np")
    os.makedirs(self.dir, exist_ok=True)
    from PIL import Image
    for i, image in enumerate(out.images):
      pixels = (np.asarray(image) * 255).round().astype(np.uint8)
      files.write_image(os.path.join(self.dir, f"step{step:07d}_{i}.png"), Image.fromarray(pixels))
      self.log.image(f"samples/{i}", step, pixels)


class PreemptionFlag:
  """Set by SIGTERM; in multi-process runs every process agrees on it (any one saw it)."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

  def is_set(self):
    flag = self._event.is_set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
    return flag

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

