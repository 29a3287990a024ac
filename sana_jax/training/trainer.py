"""The train state and the jitted train / eval steps of the Sana DiT on a device mesh.

Params are float32 master weights (plain dicts of arrays, the tree orbax saves); the model computes
in `config.dtype` (bf16 on accelerators). Everything is born sharded: the abstract state gives the
shardings, `init` is jitted with them as out_shardings, and the same abstract tree is the restore
target, so a checkpoint restores onto any mesh shape.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sana_jax import dtypes, parallel
from sana_jax.models.dit import SanaTransformer, SanaTransformerConfig
from sana_jax.training import adapters, controlnet, encoders, objective, optimizers


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer updates applied (skipped steps count too)
  params: Any              # float32 master weights, {path: array}
  opt_state: Any
  ema: Any                 # EMA of params, or None
  nonfinite: jax.Array     # int32: non-finite steps in a row (their updates were skipped)
  skipped: jax.Array       # int32: non-finite steps in all


class Trainer:
  """Builds the model graph, optimizer and shardings once; `init`, `step` and `eval_loss` are jitted.

  LoRA runs (`config.lora.rank` > 0, see adapters.py): the params it trains are the LoRA factors;
  ControlNet runs (`config.controlnet.num_layers` > 0, see controlnet.py): the ControlNet's blocks and
  projections. In both the base weights (`set_frozen`, from init_from) are a separate, undonated input
  of every step.
  """

  def __init__(self, config, mesh, rules=None, *, online_encoders=None):
    """online_encoders: the encoders to run instead of loading config.encoders' weights (plan.py's abstract ones)."""
    self.config, self.mesh, self.rules = config, mesh, rules
    self.compute_dtype = dtypes.resolve(config.dtype, "config.dtype")
    self.model_cfg = SanaTransformerConfig.from_dict(config.model)
    make = lambda: SanaTransformer(self.model_cfg, rngs=nnx.Rngs(config.seed), dtype=self.compute_dtype,
                                   param_dtype=jnp.float32, attention_impl=config.get("attention_impl", "xla"))
    self._make_model = make
    self.graphdef, abstract = nnx.split(nnx.eval_shape(make))
    self.base_shardings = nnx.to_pure_dict(parallel.state_shardings(abstract, mesh, rules))
    self.base_abstract = nnx.to_pure_dict(abstract)
    self.lora = self.control = self.frozen = None
    if adapters.enabled(config):
      self.lora = adapters.LoraPlan(config.lora, self.model_cfg, self.base_abstract, self.base_shardings)
      self.param_shardings = self.lora.shardings
      self.abstract_params = jax.eval_shape(self.lora.init, jax.random.key(0))
    elif controlnet.enabled(config):
      self.control = controlnet.ControlNetPlan(config.controlnet, self.model_cfg, mesh, rules,
                                               dtype=self.compute_dtype, seed=config.seed,
                                               attention_impl=config.get("attention_impl", "xla"))
      self.param_shardings, self.abstract_params = self.control.shardings, self.control.abstract
    else:
      self.param_shardings, self.abstract_params = self.base_shardings, self.base_abstract
    frozen_shardings = self.base_shardings if self.lora or self.control else None
    self.encoders = online_encoders  # online encoding (encoders.py): the step gets images and tokens
    if self.encoders is None and config.get("encoders"):
      self.encoders = encoders.OnlineEncoders(config.encoders, mesh, rules, dtype=self.compute_dtype)
    encoder_shardings = self.encoders.shardings if self.encoders else None
    self.tx, self.schedule = optimizers.build_optimizer(config.optim, global_batch=config.batch_size,
                                                        total_steps=config.total_steps)
    self.state_shardings = self._state_shardings()
    inputs = (("latents", 4), ("y", 3), ("mask", 2)) + ((("control", 4),) if self.control else ())
    if self.encoders:
      inputs = (("images", 4), ("ids", 2), ("tokens_mask", 2))
    self.batch_shardings = {k: parallel.batch_sharding(mesh, nd) for k, nd in inputs}
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    self._jit_step = jax.jit(self._step, in_shardings=(self.state_shardings, self.batch_shardings, None,
                                                       frozen_shardings, encoder_shardings),
                             out_shardings=(self.state_shardings, None), donate_argnums=(0,))
    self._jit_eval_loss = jax.jit(self._eval_loss)
    self._jit_merged = jax.jit(self.lora.merged) if self.lora else None

  def step(self, state, batch, null_text):
    return self._jit_step(state, batch, null_text, self.frozen, self._encoder_params())

  def lower_step(self, state, batch, null_text):
    """The step lowered for these inputs (arrays or sharded ShapeDtypeStructs): `.compile()` is the program
    `step` runs on them, and its memory_analysis() the memory it needs (plan.py)."""
    return self._jit_step.lower(state, batch, null_text, self.frozen, self._encoder_params())

  def eval_loss(self, params, batch, sigma):
    return self._jit_eval_loss(params, batch, sigma, self.frozen, self._encoder_params())

  def _encoder_params(self):
    return self.encoders.params if self.encoders else None

  def null_text(self, data_config):
    """The empty caption's (y, mask) that caption dropout swaps in: the encoders' when they run online,
    else the data's (data.null_text)."""
    if self.encoders:
      return self.encoders.null_text()
    from sana_jax import data
    return data.null_text(data_config)

  def set_frozen(self, base_params):
    """The base weights a LoRA run adapts or a ControlNet run steers (float32, sharded like the model)."""
    self.frozen = jax.device_put(base_params, self.base_shardings)

  def model_params(self, params):
    """The weights of the model a run makes: params themselves; for LoRA the base with them added; for a
    ControlNet the whole ControlNet's (its trained part with the base's embeddings)."""
    if self.control is not None:
      return self.control.full(self.frozen, params)
    return params if self.lora is None else self._jit_merged(self.frozen, params)

  # ---- state --------------------------------------------------------------------------------------

  def _new_state(self, params):
    ema = optimizers.ema_init(params) if self.config.get("ema_decay", 0) else None
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=self.tx.init(params), ema=ema, nonfinite=zero, skipped=zero)

  def _init(self):
    if self.lora is not None:
      return self._new_state(self.lora.init(jax.random.key(self.config.seed)))
    if self.control is not None:
      return self._new_state(self.control.init())
    params = nnx.to_pure_dict(nnx.state(self._make_model()))
    return self._new_state(params)

  def _state_shardings(self):
    """Optimizer moments follow their parameter's sharding; factored CAME rows/columns keep it on
    the axes they keep; counters and placeholders are replicated."""
    abstract = jax.eval_shape(self._new_state, self.abstract_params)
    flat_params = {tuple(p): (a.shape, s) for (p, a), s in zip(
        jax.tree_util.tree_flatten_with_path(self.abstract_params)[0], jax.tree.leaves(self.param_shardings))}
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
      key = tuple(path)
      for start in range(len(key)):  # the param whose path ends the moment's path
        hit = flat_params.get(key[start:])
        if hit is None or len(hit[0]) != leaf.ndim:
          continue
        # same rank: CAME's factored rows/columns keep the param's rank with the reduced axes at 1
        spec = hit[1].spec + (None,) * (leaf.ndim - len(hit[1].spec))
        spec = [axis if n == m else None for axis, n, m in zip(spec, leaf.shape, hit[0])]
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))
      return replicated

    shardings = jax.tree_util.tree_map_with_path(pick, abstract)
    return shardings.replace(params=self.param_shardings,
                             ema=None if abstract.ema is None else self.param_shardings)

  def abstract_state(self):
    """ShapeDtypeStructs with this mesh's shardings: the orbax restore target."""
    abstract = jax.eval_shape(self._init)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        self.state_shardings)

  def state_from_params(self, params):
    """A fresh train state around given float32 params (fine-tuning from a checkpoint; a ControlNet's
    start, `control.from_base(frozen)`)."""
    params = jax.device_put(params, self.param_shardings)
    return jax.jit(self._new_state, out_shardings=self.state_shardings)(params)

  # ---- steps --------------------------------------------------------------------------------------

  def _predict(self, params, frozen, x_t, timesteps, y, mask, control=None):
    with parallel.use_mesh(self.mesh, self.rules):
      if self.control is not None:
        residuals = self.control.residuals(frozen, params, x_t, timesteps, y, mask, control)
        return nnx.merge(self.graphdef, frozen)(x_t, timesteps, y, mask, controlnet_block_samples=residuals)
      model = nnx.merge(self.graphdef, params if self.lora is None else self.lora.merged(frozen, params))
      return model(x_t, timesteps, y, mask)

  def _encoded(self, batch, encoder_params):
    """The batch as latents, y and mask: encoded here from images and tokens when encoding online."""
    return batch if self.encoders is None else self.encoders.encode(encoder_params, batch)

  def _prepare(self, batch, null_text, rng):
    """Draws sigmas, noise and caption dropout for the whole global batch at once, so microbatching
    (grad_accum) changes only the order of the sums, not the samples."""
    c = self.config.objective
    x0 = batch["latents"].astype(jnp.float32)
    k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
    sigma, timesteps = objective.sample_sigmas(
        k_sigma, x0.shape[0], weighting=c.weighting, logit_mean=c.logit_mean, logit_std=c.logit_std,
        flow_shift=c.flow_shift, integer_timesteps=c.integer_timesteps)
    y, mask = objective.drop_captions(k_drop, batch["y"], batch["mask"], *null_text, c.caption_dropout)
    rows = dict(x0=x0, noise=jax.random.normal(k_noise, x0.shape, jnp.float32), sigma=sigma, timesteps=timesteps,
                y=y, mask=mask)
    if self.control is not None:  # the condition is never dropped: the caption alone is, for CFG
      rows["control"] = batch["control"].astype(jnp.float32)
    return rows

  def _loss(self, params, rows, frozen):
    predict = lambda x, t: self._predict(params, frozen, x, t, rows["y"], rows["mask"], rows.get("control"))
    return objective.flow_loss(predict, rows["x0"], rows["noise"], rows["sigma"], rows["timesteps"])

  def _grads(self, params, rows, frozen):
    """Mean loss and gradients over `grad_accum` microbatches (scanned: one microbatch's activations
    live at a time). Microbatches take strided rows so each device keeps its own rows."""
    accum = self.config.get("grad_accum", 1)
    grad_fn = jax.value_and_grad(self._loss)
    if accum == 1:
      return grad_fn(params, rows, frozen)
    micro = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(a.shape[0] // accum, accum, *a.shape[1:]), 0, 1), rows)

    def body(carry, mb):
      loss, grads = grad_fn(params, mb, frozen)
      return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
    return loss / accum, jax.tree.map(lambda g: g / accum, grads)

  def _step(self, state, batch, null_text, frozen, encoder_params):
    rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)
    rows = self._prepare(self._encoded(batch, encoder_params), null_text, rng)
    loss, grads = self._grads(state.params, rows, frozen)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(jnp.add, state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = optimizers.ema_update(ema, params, self.config.ema_decay)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        ema=None if ema is None else keep(ema, state.ema),
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1), skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=self.schedule(state.step), finite=finite)
    return new_state, metrics

  def _eval_loss(self, params, batch, sigma, frozen, encoder_params):
    """Loss at one fixed sigma with fixed noise: comparable across steps and runs."""
    batch = self._encoded(batch, encoder_params)
    x0 = batch["latents"].astype(jnp.float32)
    sig = jnp.full((x0.shape[0],), sigma, jnp.float32)
    noise = jax.random.normal(jax.random.key(self.config.seed + 1), x0.shape, jnp.float32)
    predict = lambda x, t: self._predict(params, frozen, x, t, batch["y"], batch["mask"], batch.get("control"))
    return objective.flow_loss(predict, x0, noise, sig, sig * objective.NUM_TRAIN_TIMESTEPS)

  def put_batch(self, local_batch):
    """Process-local numpy rows -> global arrays split over (data, fsdp); image batches are tokenized
    first when encoding online."""
    if self.encoders:
      local_batch = {**local_batch, **self.encoders.host_batch(local_batch)}
    out = {}
    for key, sharding in self.batch_shardings.items():
      value = np.asarray(local_batch[key])
      out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out

