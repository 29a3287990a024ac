"""diffusers' SanaControlNetModel: the DiT's embeddings and first blocks, steered by a condition image.

The condition's latents are patch-embedded by the model's own patch embedding and added, through the
zero-initialised `input_block`, to the embedded noisy latents; `num_layers` transformer blocks (copies of
the base's first blocks when trained from it) run on that; each block's output, through its
zero-initialised `controlnet_blocks` projection and times `conditioning_scale`, is a residual the base
transformer adds after its block k + 1 (SanaTransformer's `controlnet_block_samples`). It is the
transformer without its output layer, so it reuses SanaTransformer's embedding, text and block code.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from sana_jax.errors import SanaError
from sana_jax.models import layers as L
from sana_jax.models.dit import SanaTransformer


class SanaControlNetModel(SanaTransformer):
  """Call: model(x [B, H, W, C], timestep [B], text [B, L, Dc], mask [B, L], controlnet_cond [B, H, W, C],
  conditioning_scale) -> residuals [num_layers, B, tokens, D]."""

  def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla"):
    if config.guidance_embeds or config.qk_norm:
      raise SanaError("a Sana ControlNet has no guidance embedding and no q/k norms (diffusers' SanaControlNetModel)")
    super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    del self.scale_shift_table, self.norm_out, self.proj_out  # no output layer: it returns residuals
    d, kw = config.inner_dim, dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.input_block = L.Dense(d, d, ("heads", "embed"), kernel_init=L.zeros, **kw)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_projections(rngs):
      return L.Dense(d, d, ("heads", "embed"), kernel_init=L.zeros, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    self.controlnet_blocks = make_projections(rngs)

  def __call__(self, x, timestep, encoder_hidden_states=None, encoder_attention_mask=None, controlnet_cond=None,
               conditioning_scale=1.0, text=None):
    if controlnet_cond is None or controlnet_cond.shape != x.shape:
      raise SanaError(f"controlnet_cond must be condition latents shaped like x {tuple(x.shape)}")
    if text is None:
      text = self.encode_text(encoder_hidden_states, encoder_attention_mask)
    h, hw = self.embed(x)
    h = h + self.input_block(self.embed(controlnet_cond)[0])
    t6, _ = self.embed_time(timestep, x.shape[0])
    _, outputs = self._run_blocks(h, t6, text, hw, collect=True)
    graphdef, stacked = nnx.split(self.controlnet_blocks)
    residuals = jax.vmap(lambda layer, out: nnx.merge(graphdef, layer)(out))(stacked, outputs)
    return residuals * jnp.asarray(conditioning_scale, residuals.dtype)

  @classmethod
  def from_pretrained(cls, path, dtype=jnp.float32, attention_impl="xla", *, param_dtype=None, mesh=None,
                      rules=None, **config_overrides):
    """Loads a diffusers `SanaControlNetModel` directory (config.json + safetensors)."""
    from sana_jax.convert import diffusers_controlnet
    return diffusers_controlnet.load(path, dtype=dtype, param_dtype=param_dtype or dtype,
                                     attention_impl=attention_impl, mesh=mesh, rules=rules, **config_overrides)

  @classmethod
  def from_single_file(cls, path, dtype=jnp.float32, attention_impl="xla", *, resolution=None, config=None,
                       param_dtype=None, mesh=None, rules=None):
    """Loads the ControlNet of an original NVlabs/Sana ControlNet checkpoint (.pth, read without
    unpickling code); see SanaTransformer.from_single_file for `resolution` and `config` (the base's)."""
    from sana_jax.convert import nvlabs
    return nvlabs.load(path, resolution=resolution, config=config, dtype=dtype, param_dtype=param_dtype or dtype,
                       attention_impl=attention_impl, mesh=mesh, rules=rules, controlnet=True)

  def save_pretrained(self, directory, dtype="float32", **kwargs):
    """Writes a diffusers `SanaControlNetModel` directory."""
    from sana_jax.convert import writing
    writing.save_pretrained(self, directory, dtype, **kwargs)
