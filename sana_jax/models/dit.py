"""The Sana linear DiT (diffusers' SanaTransformer2DModel) in Flax NNX, NHWC.

Blocks are built once with stacked parameters (leading "layers" axis) and run under `lax.scan`,
so compile time does not grow with depth; `remat` picks a rematerialisation policy for training.
"""
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sana_jax import fields as F
from sana_jax import parallel
from sana_jax.errors import SanaError, short
from sana_jax.kernels import linear_attention
from sana_jax.kernels.linear_attention import IMPLEMENTATIONS
from sana_jax.models import layers as L

_TOKENS = ("batch", "seq", None)  # image tokens [B, N, D]: batch split, tokens split under sequence parallelism
_GRID = ("batch", "seq", None, None)  # the same as [B, H, W, D]: latent rows split
_TEXT = ("batch", None, None)  # caption tokens: whole on every device
_MASK_BIAS = -10000.0  # diffusers turns the 0/1 text mask into this additive bias (not -inf)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class SanaTransformerConfig:
  """Field names follow diffusers' config.json so a checkpoint's config loads as it is."""
  in_channels: int = 32
  out_channels: int | None = 32
  num_attention_heads: int = 70
  attention_head_dim: int = 32
  num_layers: int = 20
  num_cross_attention_heads: int = 20
  cross_attention_head_dim: int = 112
  cross_attention_dim: int = 2240
  caption_channels: int = 2304
  mlp_ratio: float = 2.5
  attention_bias: bool = False
  sample_size: int = 32
  patch_size: int = 1
  norm_elementwise_affine: bool = False
  norm_eps: float = 1e-6
  interpolation_scale: float | None = None
  guidance_embeds: bool = False
  guidance_embeds_scale: float = 0.1
  qk_norm: str | None = None
  timestep_scale: float = 1.0
  # ours, not in diffusers' config
  linear_attention_eps: float = 1e-15  # diffusers; the original repository uses 1e-8
  remat: str = "none"
  # layers per scan iteration. 2 costs one extra block of compile time (still flat in depth) and
  # runs faster on XLA:CPU (medium bench: 342 -> 310 ms) and on an H100 (Sana 0.6B: 35.7 -> 34.7 ms)
  scan_unroll: int = 2

  @property
  def inner_dim(self):
    return self.num_attention_heads * self.attention_head_dim

  @property
  def ffn_hidden(self):
    return int(self.mlp_ratio * self.inner_dim)

  @classmethod
  def from_dict(cls, d, source="transformer config"):
    """Reads a diffusers config dict or a config's `model` ConfigDict; `_`-prefixed metadata is
    skipped, unknown keys are errors, every field is type- and range-checked."""
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    if F.validate({"dropout": d.pop("dropout", 0.0)}, _CHECKS, source)["dropout"]:
      raise SanaError(f"{source}: dropout > 0 is a training-time option sana-jax does not model")
    unknown = sorted(set(d) - known)
    if unknown:
      raise SanaError(f"{source}: unknown transformer config key(s) {short(unknown)}")
    return cls(**d).validated(source)

  def validated(self, source="transformer config"):
    """This config with every field type- and range-checked; a SanaError names the first bad one."""
    self = dataclasses.replace(self, **F.validate(dataclasses.asdict(self), _CHECKS, source))
    if self.cross_attention_dim != self.inner_dim:
      raise SanaError(f"{source}: cross_attention_dim {self.cross_attention_dim} must equal the model width "
                      f"{self.inner_dim} (the text is projected to it before cross-attention)")
    if self.inner_dim > _MAX_WIDTH or self.ffn_hidden > 8 * _MAX_WIDTH:
      raise SanaError(f"{source}: width {self.inner_dim} (feed-forward {self.ffn_hidden}) is beyond any Sana model")
    return self


_MAX_WIDTH = 1 << 16
_CHECKS = {  # every field a config file may set: type and range
    "in_channels": F.integer(1, 4096), "out_channels": F.optional(F.integer(1, 4096)),
    "num_attention_heads": F.integer(1, 1024), "attention_head_dim": F.integer(1, 1024),
    "num_layers": F.integer(1, 512), "num_cross_attention_heads": F.integer(1, 1024),
    "cross_attention_head_dim": F.integer(1, 1024), "cross_attention_dim": F.integer(1, _MAX_WIDTH),
    "caption_channels": F.integer(1, _MAX_WIDTH), "mlp_ratio": F.real(hi=64, above=0),
    "attention_bias": F.boolean, "sample_size": F.integer(1, 1024), "patch_size": F.integer(1, 16),
    "norm_elementwise_affine": F.boolean, "norm_eps": F.real(hi=1, above=0),
    "interpolation_scale": F.optional(F.real(hi=1000, above=0)), "guidance_embeds": F.boolean,
    "guidance_embeds_scale": F.real(-1e6, 1e6), "qk_norm": F.choice(None, "rms_norm_across_heads"),
    "timestep_scale": F.real(hi=1e6, above=0), "dropout": F.real(0, 1),
    "linear_attention_eps": F.real(hi=1, above=0), "remat": F.choice(*REMAT_POLICIES), "scan_unroll": F.integer(1, 512),
}


class TimestepEmbedder(nnx.Module):
  """sinusoid(256) -> Linear -> SiLU -> Linear (diffusers' TimestepEmbedding)."""

  def __init__(self, dim, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=nnx.initializers.normal(0.02))
    self.linear_1 = L.Dense(256, dim, (None, "embed"), **kw)
    self.linear_2 = L.Dense(dim, dim, ("embed", "embed_out"), **kw)
    self.dtype = dtype

  def __call__(self, t):
    return self.linear_2(jax.nn.silu(self.linear_1(L.timestep_sinusoid(t).astype(self.dtype))))


class TimeEmbed(nnx.Module):
  """adaLN-single: one shared SiLU -> Linear(D, 6D) on the (optionally guidance-summed) time embedding."""

  def __init__(self, dim, guidance_embeds, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.timestep_embedder = TimestepEmbedder(dim, **kw)
    self.guidance_embedder = TimestepEmbedder(dim, **kw) if guidance_embeds else None
    self.linear = L.Dense(dim, (6, dim), ("embed", None, "embed_out"), **kw)

  def __call__(self, t, guidance=None):
    emb = self.timestep_embedder(t)
    if self.guidance_embedder is not None:
      emb = emb + self.guidance_embedder(guidance)
    return self.linear(jax.nn.silu(emb)), emb  # [B, 6, D], [B, D]


class CaptionProjection(nnx.Module):
  """Linear -> GELU(tanh) -> Linear from the text encoder width to the model width."""

  def __init__(self, din, dim, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.linear_1 = L.Dense(din, dim, ("caption", "embed"), **kw)
    self.linear_2 = L.Dense(dim, dim, ("embed", "embed_out"), **kw)

  def __call__(self, y):
    return self.linear_2(jax.nn.gelu(self.linear_1(y), approximate=True))


class LinearSelfAttention(nnx.Module):
  """ReLU linear attention over all tokens; optional RMSNorm of q and k across heads (Sana 1.5)."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d, kw = cfg.inner_dim, dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.to_q = L.Dense(d, d, ("embed", "heads"), use_bias=cfg.attention_bias, **kw)
    self.to_k = L.Dense(d, d, ("embed", "heads"), use_bias=cfg.attention_bias, **kw)
    self.to_v = L.Dense(d, d, ("embed", "heads"), use_bias=cfg.attention_bias, **kw)
    self.to_out = L.Dense(d, d, ("heads", "embed"), **kw)
    self.norm_q = L.RMSNorm(d, "heads", eps=1e-5, **kw) if cfg.qk_norm else None
    self.norm_k = L.RMSNorm(d, "heads", eps=1e-5, **kw) if cfg.qk_norm else None
    self.heads, self.eps, self.dtype = cfg.num_attention_heads, cfg.linear_attention_eps, dtype
    self.attention_impl = "xla"

  def __call__(self, x, identity_rows=None):
    """identity_rows [B] bool (perturbed-attention guidance): those rows skip attention, giving
    to_out(to_v(x)), as diffusers' PAG processors do in the chosen layers."""
    q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
    if self.norm_q is not None:
      q, k = self.norm_q(q), self.norm_k(k)
    b, n, _ = x.shape
    split = lambda a: a.reshape(b, n, self.heads, -1)
    q, k = jax.nn.relu(split(q)), jax.nn.relu(split(k))
    out = linear_attention(q, k, split(v), eps=self.eps, implementation=self.attention_impl)
    out = out.reshape(b, n, -1).astype(self.dtype)
    if identity_rows is not None:
      out = jnp.where(identity_rows[:, None, None], v.astype(self.dtype), out)
    out = self.to_out(out)
    if jnp.dtype(self.dtype) == jnp.float16:  # the reference clips here; the 1.6B fp16 weights overflow without it
      out = jnp.clip(out, -65504, 65504)
    return out


class CrossAttention(nnx.Module):
  """Softmax attention from image tokens to text tokens with the text mask as an additive bias."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d, kw = cfg.inner_dim, dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    inner = cfg.num_cross_attention_heads * cfg.cross_attention_head_dim
    self.to_q = L.Dense(d, inner, ("embed", "heads"), **kw)
    self.to_k = L.Dense(cfg.cross_attention_dim, inner, ("embed", "heads"), **kw)
    self.to_v = L.Dense(cfg.cross_attention_dim, inner, ("embed", "heads"), **kw)
    self.to_out = L.Dense(inner, d, ("heads", "embed"), kernel_init=L.zeros, **kw)
    self.norm_q = L.RMSNorm(inner, "heads", eps=1e-5, **kw) if cfg.qk_norm else None
    self.norm_k = L.RMSNorm(inner, "heads", eps=1e-5, **kw) if cfg.qk_norm else None
    self.heads, self.head_dim, self.dtype = cfg.num_cross_attention_heads, cfg.cross_attention_head_dim, dtype

  def project_text(self, y):
    """Keys and values [B, L, H, Dh] of the projected text y [B, L, D]: fixed for a whole generation."""
    k, v = self.to_k(y), self.to_v(y)
    if self.norm_k is not None:
      k = self.norm_k(k)
    split = lambda a: a.reshape(*a.shape[:2], self.heads, self.head_dim)
    return split(k), split(v)

  def __call__(self, x, text_kv, mask_bias):
    """x [B, N, D], text_kv from project_text, mask_bias [B, L] float32 (0 or -10000)."""
    q = self.to_q(x)
    if self.norm_q is not None:
      q = self.norm_q(q)
    k, v = text_kv
    q = q.reshape(*x.shape[:2], self.heads, self.head_dim)
    return self.to_out(L.masked_attention(q, k, v, mask_bias).reshape(*x.shape[:2], -1))


class SanaBlock(nnx.Module):
  """adaLN-modulated linear self-attention, unmodulated cross-attention, modulated Mix-FFN."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d, kw = cfg.inner_dim, dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = L.LayerNorm(d, "embed", eps=cfg.norm_eps, **kw)
    self.attn1 = LinearSelfAttention(cfg, **kw)
    self.attn2 = CrossAttention(cfg, **kw)
    self.norm2 = L.LayerNorm(d, "embed", eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, **kw)
    self.ff = L.MixFFN(d, cfg.ffn_hidden, **kw)
    self.scale_shift_table = L.param(rngs, nnx.initializers.normal(d ** -0.5), (6, d), (None, "embed"),
                                     param_dtype)
    self.dtype = dtype

  def __call__(self, x, t6, text_kv, mask_bias, hw, identity_rows=None):
    """x [B, N, D]; t6 [B, 6, D]; text_kv: this block's text keys/values; hw = (H, W), H * W = N."""
    mod = self.scale_shift_table[...].astype(self.dtype)[None] + t6
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i:i + 1] for i in range(6))
    h = self.norm1(x) * (1 + scale_msa) + shift_msa
    x = x + gate_msa * self.attn1(h, identity_rows)
    x = x + self.attn2(x, text_kv, mask_bias)
    h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
    b, n, d = x.shape
    ff = self.ff(parallel.constrain(h.reshape(b, *hw, d), _GRID)).reshape(b, n, d)  # conv halos cross devices
    return x + gate_mlp * ff


class TextContext(NamedTuple):
  """Per-generation text state: stacked cross-attention keys/values and the mask as a bias."""
  keys: jax.Array
  values: jax.Array
  mask_bias: jax.Array


class SanaTransformer(nnx.Module):
  """Sana's DiT. Call: model(x [B, H, W, C], timestep [B], text [B, L, Dc], mask [B, L]) -> velocity.

  `timestep` is the sampler's time; the model multiplies it by `config.timestep_scale` (and a
  guidance value by `config.guidance_embeds_scale`) itself, as diffusers' pipelines do before
  calling their transformer.
  """

  def __init__(self, config: SanaTransformerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl="xla"):
    cfg = self.config = config.validated()
    d, p = cfg.inner_dim, cfg.patch_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.patch_embed = L.Dense(p * p * cfg.in_channels, d, ("patch", "embed"), **kw)
    self.time_embed = TimeEmbed(d, cfg.guidance_embeds, **kw)
    self.caption_projection = CaptionProjection(cfg.caption_channels, d, **kw)
    self.caption_norm = L.RMSNorm(d, "embed", eps=1e-5, **kw)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return SanaBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    self.blocks = make_blocks(rngs)
    self.scale_shift_table = L.param(rngs, nnx.initializers.normal(d ** -0.5), (2, d), (None, "embed"),
                                     param_dtype)
    self.norm_out = L.LayerNorm(d, "embed", eps=1e-6, **kw)
    out_ch = cfg.out_channels or cfg.in_channels
    self.proj_out = L.Dense(d, p * p * out_ch, ("embed", "patch"), kernel_init=L.zeros, **kw)
    self.set_attention_impl(attention_impl)

  def set_attention_impl(self, impl):
    """Linear-attention backend: "auto" (the fastest that works), or one forced by name."""
    if impl not in IMPLEMENTATIONS:
      raise SanaError(f"attention_impl={impl!r}; expected one of {IMPLEMENTATIONS}")
    self.blocks.attn1.attention_impl = impl

  def encode_text(self, encoder_hidden_states, encoder_attention_mask=None):
    """The text's share of the computation, the same at every sampling step: caption projection and
    norm, then every block's cross-attention keys and values ([layers, B, L, H, Dh] each)."""
    y = self.caption_norm(self.caption_projection(encoder_hidden_states.astype(self.dtype)))
    y = parallel.constrain(y, _TEXT)
    if encoder_attention_mask is None:
      encoder_attention_mask = jnp.ones(y.shape[:2], jnp.float32)
    mask_bias = (1.0 - encoder_attention_mask.astype(jnp.float32)) * _MASK_BIAS
    graphdef, stacked = nnx.split(self.blocks)
    keys, values = jax.vmap(lambda layer: nnx.merge(graphdef, layer).attn2.project_text(y))(stacked)
    return TextContext(keys, values, mask_bias)

  def embed(self, x):
    """Patch-embedded tokens [B, hp*wp, D] of latents [B, H, W, C] (with the position embedding), and (hp, wp)."""
    cfg, p = self.config, self.config.patch_size
    b, H, W, c = x.shape
    if H % p or W % p:
      raise SanaError(f"latent size {H}x{W} is not a multiple of the patch size {p}")
    hp, wp = H // p, W // p
    # patchify: [B, H, W, C] -> [B, hp*wp, p*p*C] in (row, col, channel) order, like the conv's weight
    tokens = x.reshape(b, hp, p, wp, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp * wp, p * p * c)
    h = self.patch_embed(tokens.astype(self.dtype))
    if cfg.interpolation_scale is not None:
      pos = L.sincos_pos_embed_2d(cfg.inner_dim, hp, wp, cfg.sample_size // p, cfg.interpolation_scale)
      h = (h.astype(jnp.float32) + pos[None]).astype(self.dtype)
    return parallel.constrain(h, _TOKENS), (hp, wp)

  def embed_time(self, timestep, batch, guidance=None):
    """(the blocks' 6-way modulation [B, 6, D], the final layer's embedding [B, D]) of the sampler's time."""
    cfg = self.config
    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32) * cfg.timestep_scale, (batch,))
    if cfg.guidance_embeds:
      if guidance is None:
        raise SanaError("this model was trained with a guidance embedding: pass `guidance`")
      guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32) * cfg.guidance_embeds_scale, (batch,))
    return self.time_embed(t, guidance)

  def __call__(self, x, timestep, encoder_hidden_states=None, encoder_attention_mask=None, guidance=None, text=None,
               perturbed=None, controlnet_block_samples=None):
    """Velocity [B, H, W, C]. Pass `text=model.encode_text(...)` to reuse the text's keys and values
    across sampling steps instead of encoder_hidden_states / encoder_attention_mask.
    perturbed = (rows [B] bool, layers [num_layers] bool): perturbed-attention guidance's identity
    self-attention for those rows in those layers. controlnet_block_samples [n, B, tokens, D]: a
    ControlNet's residuals, the k-th added after block k + 1 (diffusers' wiring)."""
    b, H, W, _ = x.shape
    if text is None:
      text = self.encode_text(encoder_hidden_states, encoder_attention_mask)
    h, (hp, wp) = self.embed(x)
    t6, t_emb = self.embed_time(timestep, b, guidance)
    h = self._run_blocks(h, t6, text, (hp, wp), perturbed, controlnet_block_samples)

    shift, scale = jnp.split(self.scale_shift_table[...].astype(self.dtype)[None] + t_emb[:, None], 2, axis=1)
    h = self.norm_out(h) * (1 + scale) + shift
    out = self.proj_out(h)  # [B, N, p*p*C] in (p_row, p_col, C) order
    p = self.config.patch_size
    out = out.reshape(b, hp, wp, p, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, H, W, -1)
    return parallel.constrain(out, _GRID)

  def _run_blocks(self, h, t6, text, hw, perturbed=None, residuals=None, collect=False):
    """The blocks in one scan; `collect`: also every block's output, stacked [layers, B, tokens, D]."""
    graphdef, stacked = nnx.split(self.blocks)
    rows, layers = perturbed if perturbed is not None else (None, jnp.zeros(self.config.num_layers, bool))
    if residuals is not None and not 0 < residuals.shape[0] < self.config.num_layers:
      raise SanaError(f"{residuals.shape[0]} ControlNet residuals for a transformer of {self.config.num_layers} "
                      f"blocks; expected 1 to {self.config.num_layers - 1}")

    def body(carry, xs):
      layer_state, keys, values, perturb_layer, index = xs
      identity = None if rows is None else rows & perturb_layer
      out = nnx.merge(graphdef, layer_state)(carry, t6, (keys, values), text.mask_bias, hw, identity)
      if residuals is not None:  # after block k (1 <= k <= n) comes residual k - 1
        k = jnp.clip(index - 1, 0, residuals.shape[0] - 1)
        used = (index >= 1) & (index <= residuals.shape[0])
        out = out + jnp.where(used, residuals[k], 0).astype(out.dtype)
      out = parallel.constrain(out, _TOKENS)
      return out, out if collect else None

    policy = REMAT_POLICIES[self.config.remat]
    if self.config.remat != "none":
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    xs = (stacked, text.keys, text.values, jnp.asarray(layers), jnp.arange(self.config.num_layers))
    h, outputs = jax.lax.scan(body, h, xs, unroll=self.config.scan_unroll)
    return (h, outputs) if collect else h

  @classmethod
  def from_pretrained(cls, path, dtype=jnp.float32, attention_impl="xla", *, param_dtype=None, mesh=None,
                      rules=None, **config_overrides):
    """Loads a diffusers `SanaTransformer2DModel` directory (config.json + safetensors)."""
    from sana_jax.convert import diffusers_dit
    return diffusers_dit.load(path, dtype=dtype, param_dtype=param_dtype or dtype,
                              attention_impl=attention_impl, mesh=mesh, rules=rules, **config_overrides)

  @classmethod
  def from_single_file(cls, path, dtype=jnp.float32, attention_impl="xla", *, resolution=None, config=None,
                       param_dtype=None, mesh=None, rules=None):
    """Loads an original NVlabs/Sana checkpoint file (.pth, read without unpickling code, or an
    original-layout .safetensors). Its config is inferred for the released sizes; `resolution` (512,
    1024, 2048, 4096; default from the checkpoint's pos_embed) sets the sample size and position
    embedding; `config` (a dict or a diffusers config.json path) overrides any field."""
    from sana_jax.convert import nvlabs
    return nvlabs.load(path, resolution=resolution, config=config, dtype=dtype, param_dtype=param_dtype or dtype,
                       attention_impl=attention_impl, mesh=mesh, rules=rules)

  def save_pretrained(self, directory, dtype="float32", **kwargs):
    """Writes a diffusers `SanaTransformer2DModel` directory (config.json + safetensors in `dtype`).
    linear_attention_eps, remat and scan_unroll have no diffusers field and are not saved."""
    from sana_jax.convert import writing
    writing.save_pretrained(self, directory, dtype, **kwargs)


def pure_forward(model):
  """(apply, state): apply(state, x, timestep, text, mask, guidance=None) is a pure function of the
  split-once state, for `jax.jit` on hot paths without an NNX graph walk per call."""
  graphdef, state = nnx.split(model)

  def apply(state, x, timestep, encoder_hidden_states, encoder_attention_mask=None, guidance=None):
    return nnx.merge(graphdef, state)(x, timestep, encoder_hidden_states, encoder_attention_mask, guidance)

  return apply, state
