"""Gemma-2 as Sana uses it: the decoder of gemma-2-2b-it, returning the last hidden state after the
final norm, in Flax NNX. Layers are stacked and scanned; each layer's kind (sliding-window or
global attention) is a scanned flag, so compile time stays flat in depth.
"""
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sana_jax import fields as F
from sana_jax import parallel
from sana_jax.errors import SanaError, short
from sana_jax.models import layers as L


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """The Gemma-2 fields that matter here, named as in transformers' config.json."""
  vocab_size: int = 256000
  hidden_size: int = 2304
  intermediate_size: int = 9216
  num_hidden_layers: int = 26
  num_attention_heads: int = 8
  num_key_value_heads: int = 4
  head_dim: int = 256
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  attention_bias: bool = False
  query_pre_attn_scalar: float = 256
  sliding_window: int = 4096
  layer_types: tuple = ()  # "sliding_attention" / "full_attention" per layer; default alternates
  attn_logit_softcapping: float | None = 50.0
  final_logit_softcapping: float | None = 30.0
  hidden_activation: str = "gelu_pytorch_tanh"
  scan_unroll: int = 2  # ours: layers per scan step

  @classmethod
  def from_transformers(cls, d, source="text encoder config"):
    """From a transformers Gemma2Config dict; generic transformers keys are ignored."""
    if d.get("model_type", "gemma2") != "gemma2":
      raise SanaError(f"{source} describes a {short(d.get('model_type'))} model, not gemma2")
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in fields}
    rope = d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
      raise SanaError(f"{source}: rope_parameters must be an object")
    if "rope_theta" in rope:
      kw["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
      raise SanaError(f"{source}: rope_type {short(rope['rope_type'])} is not used by Gemma-2; expected 'default'")
    kw["layer_types"] = kw.get("layer_types") or ()
    return cls(**kw).validated(source)

  def validated(self, source="text encoder config"):
    """This config with every field type- and range-checked (lists as tuples)."""
    self = dataclasses.replace(self, **F.validate(dataclasses.asdict(self), _CHECKS, source))
    if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
      raise SanaError(f"{source}: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
    if self.num_attention_heads % self.num_key_value_heads:
      raise SanaError(f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                      f"num_key_value_heads {self.num_key_value_heads}")
    return self

  @property
  def sliding_layers(self):
    """Per layer: does it attend within the sliding window? (Gemma-2 alternates, sliding first.)"""
    types = self.layer_types or tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                      for i in range(self.num_hidden_layers))
    return tuple(t == "sliding_attention" for t in types)


_CHECKS = {  # every field a config file may set: type and range
    "vocab_size": F.integer(1, 1 << 20), "hidden_size": F.integer(1, 1 << 16),
    "intermediate_size": F.integer(1, 1 << 18), "num_hidden_layers": F.integer(1, 512),
    "num_attention_heads": F.integer(1, 1024), "num_key_value_heads": F.integer(1, 1024),
    "head_dim": F.integer(1, 1024),
    "rms_norm_eps": F.real(hi=1, above=0), "rope_theta": F.real(hi=1e12, above=0), "attention_bias": F.boolean,
    "query_pre_attn_scalar": F.real(hi=1e9, above=0), "sliding_window": F.integer(1, 1 << 24),
    "layer_types": F.sequence(F.choice("sliding_attention", "full_attention"), max_len=512),
    "attn_logit_softcapping": F.optional(F.real(hi=1e9, above=0)),
    "final_logit_softcapping": F.optional(F.real(hi=1e9, above=0)),
    "hidden_activation": F.choice("gelu_pytorch_tanh", "gelu_tanh"), "scan_unroll": F.integer(1, 512),
}


class GemmaAttention(nnx.Module):
  """Grouped-query attention with RoPE, logit soft-capping and a boolean mask."""

  def __init__(self, cfg: GemmaConfig, **kw):
    d, hd = cfg.hidden_size, cfg.head_dim
    dense = lambda din, dout, axes: L.Dense(din, dout, axes, use_bias=cfg.attention_bias, **kw)
    self.q_proj = dense(d, cfg.num_attention_heads * hd, ("embed", "heads"))
    self.k_proj = dense(d, cfg.num_key_value_heads * hd, ("embed", "heads"))
    self.v_proj = dense(d, cfg.num_key_value_heads * hd, ("embed", "heads"))
    self.o_proj = dense(cfg.num_attention_heads * hd, d, ("heads", "embed"))
    self.cfg, self.dtype = cfg, kw["dtype"]

  def __call__(self, x, cos, sin, mask, prefix_kv=None):
    """x [B, L, D]; cos/sin [L, hd]; mask [B, L, P + L] bool (query, key); prefix_kv: cached keys and
    values [1, P, KV, hd] of P earlier tokens. Returns ([B, L, D], this call's (keys, values))."""
    cfg = self.cfg
    b, n, _ = x.shape
    kv, groups = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    q = rope(self.q_proj(x).reshape(b, n, cfg.num_attention_heads, cfg.head_dim), cos, sin)
    k_new = rope(self.k_proj(x).reshape(b, n, kv, cfg.head_dim), cos, sin)
    v_new = self.v_proj(x).reshape(b, n, kv, cfg.head_dim)
    k, v = k_new, v_new
    if prefix_kv is not None:
      grow = lambda a: jnp.broadcast_to(a.astype(k.dtype), (b, *a.shape[1:]))
      k = jnp.concatenate([grow(prefix_kv[0]), k], axis=1)
      v = jnp.concatenate([grow(prefix_kv[1]), v], axis=1)
    q = q.reshape(b, n, kv, groups, cfg.head_dim)
    logits = L.einsum_f32("bqkgd,bmkd->bkgqm", q, k) * cfg.query_pre_attn_scalar ** -0.5
    if cfg.attn_logit_softcapping:
      logits = jnp.tanh(logits / cfg.attn_logit_softcapping) * cfg.attn_logit_softcapping
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgqm,bmkd->bqkgd", probs, v).reshape(b, n, -1)
    return self.o_proj(out), (k_new, v_new)


def rope(x, cos, sin):
  """Rotary embedding on [B, L, H, hd], halves rotated (transformers' rotate_half convention)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[None, :, None] + rotated * sin[None, :, None]


class GemmaMLP(nnx.Module):
  """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

  def __init__(self, cfg: GemmaConfig, **kw):
    self.gate_proj = L.Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), use_bias=False, **kw)
    self.up_proj = L.Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), use_bias=False, **kw)
    self.down_proj = L.Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), use_bias=False, **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class GemmaLayer(nnx.Module):
  """Pre- and post-norms around both the attention and the MLP (Gemma-2's sandwich)."""

  def __init__(self, cfg: GemmaConfig, **kw):
    norm = lambda: L.RMSNorm(cfg.hidden_size, "embed", eps=cfg.rms_norm_eps, weight_offset=1.0, **kw)
    self.input_layernorm, self.post_attention_layernorm = norm(), norm()
    self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
    self.self_attn = GemmaAttention(cfg, **kw)
    self.mlp = GemmaMLP(cfg, **kw)

  def __call__(self, x, cos, sin, mask, prefix_kv=None):
    attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix_kv)
    x = x + self.post_attention_layernorm(attn)
    return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), kv


class GemmaTextEncoder(nnx.Module):
  """input_ids [B, L] int, attention_mask [B, L] 0/1 -> last hidden state [B, L, hidden] (final norm)."""

  def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    cfg = self.config = config.validated()
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.embed_tokens = L.param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                                ("vocab", "embed"), param_dtype)

    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return GemmaLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    self.layers = make_layers(rngs)
    self.norm = L.RMSNorm(cfg.hidden_size, "embed", eps=cfg.rms_norm_eps, weight_offset=1.0, **kw)
    self.dtype = dtype

  def __call__(self, input_ids, attention_mask=None, prefix=None):
    """Last hidden states [B, L, hidden] of `input_ids` (right-padded; mask 1 = real token).

    With `prefix` (from `encode_prefix`), input_ids continue those tokens: positions start after
    them and attention also sees their cached keys and values. Causal attention makes this equal
    to running prefix + input_ids in one pass.
    """
    return self._forward(input_ids, attention_mask, prefix, return_prefix=False)

  def encode_prefix(self, prefix_ids):
    """Hidden states and per-layer keys/values of a shared prefix [1, P] (e.g. Sana's CHI)."""
    return self._forward(prefix_ids, None, None, return_prefix=True)

  def _forward(self, input_ids, attention_mask, prefix, return_prefix):
    cfg = self.config
    b, n = input_ids.shape
    offset = 0 if prefix is None else prefix.hidden.shape[1]
    if attention_mask is None:
      attention_mask = jnp.ones((b, n), jnp.int32)
    # the scale is cast to the compute dtype first, as transformers does (48.0 is exact in bf16)
    x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
    # a lookup in a table split over fsdp comes out split over the width with the batch whole on every device
    x = parallel.constrain(x, ("batch", None, None))
    x = x * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
    cos, sin = rope_tables(offset + n, cfg.head_dim, cfg.rope_theta, self.dtype)
    cos, sin = cos[offset:], sin[offset:]
    q_pos, k_pos = offset + jnp.arange(n), jnp.arange(offset + n)
    key_valid = jnp.concatenate([jnp.ones((b, offset), bool), attention_mask > 0], axis=1)
    full = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]        # [B, q, k]
    sliding = full & (k_pos[None, :] > q_pos[:, None] - cfg.sliding_window)[None]
    graphdef, stacked = nnx.split(self.layers)

    def body(h, xs):
      layer_state, is_sliding, prefix_kv = xs
      h, kv = nnx.merge(graphdef, layer_state)(h, cos, sin, jnp.where(is_sliding, sliding, full), prefix_kv)
      return h, (kv if return_prefix else None)

    flags = jnp.asarray(cfg.sliding_layers)
    prefix_kv = None if prefix is None else (prefix.keys, prefix.values)
    x, kv = jax.lax.scan(body, x, (stacked, flags, prefix_kv), unroll=cfg.scan_unroll)
    hidden = self.norm(x)
    return GemmaPrefix(hidden, *kv) if return_prefix else hidden

  def lm_logits(self, hidden):
    """Next-token logits from hidden states (tied embeddings, final soft-capping): for classifiers."""
    logits = L.einsum_f32("bld,vd->blv", hidden, self.embed_tokens[...].astype(self.dtype))
    cap = self.config.final_logit_softcapping
    return jnp.tanh(logits / cap) * cap if cap else logits

  @classmethod
  def from_pretrained(cls, path, dtype=jnp.float32, *, param_dtype=None, mesh=None, rules=None):
    """Loads a transformers Gemma-2 directory (Gemma2Model or Gemma2ForCausalLM), or a pipeline's text_encoder/."""
    from sana_jax.convert import transformers_gemma
    return transformers_gemma.load(path, dtype=dtype, param_dtype=param_dtype or dtype, mesh=mesh, rules=rules)

  def save_pretrained(self, directory, dtype="float32", **kwargs):
    """Writes a transformers `Gemma2Model` directory (config.json + safetensors in `dtype`)."""
    from sana_jax.convert import writing
    writing.save_pretrained(self, directory, dtype, **kwargs)


class GemmaPrefix(NamedTuple):
  """A shared prefix's outputs: hidden [1, P, D] and per-layer keys/values [layers, 1, P, KV, hd]."""
  hidden: jax.Array
  keys: jax.Array
  values: jax.Array


def rope_tables(n, head_dim, theta, dtype):
  """cos and sin [n, head_dim] for positions 0..n-1, computed in float32 then cast (as transformers)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = jnp.arange(n, dtype=jnp.float32)[:, None] * inv_freq[None]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
