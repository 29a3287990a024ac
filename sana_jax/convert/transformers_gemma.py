"""transformers Gemma-2 checkpoints (Gemma2Model or Gemma2ForCausalLM) -> sana_jax.GemmaTextEncoder."""
from flax import nnx

from sana_jax.convert import loading
from sana_jax.convert.table import identity, linear
from sana_jax.models.gemma import GemmaConfig, GemmaTextEncoder

_L = r"(?:model\.)?layers\.(\d+)\."
TABLE = [
    (r"(?:model\.)?embed_tokens\.weight", "embed_tokens", identity),
    (r"(?:model\.)?norm\.weight", "norm.weight", identity),
    (_L + r"self_attn\.([qkvo])_proj\.weight", r"layers.{layer}.self_attn.\2_proj.kernel", linear),
    (_L + r"self_attn\.([qkvo])_proj\.bias", r"layers.{layer}.self_attn.\2_proj.bias", identity),
    (_L + r"mlp\.(gate|up|down)_proj\.weight", r"layers.{layer}.mlp.\2_proj.kernel", linear),
    (_L + r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)\.weight",
     r"layers.{layer}.\2.weight", identity),
    (r"lm_head\.weight", None, identity),  # tied to embed_tokens in Gemma-2; lm_logits uses those
]


def load(path, *, dtype, param_dtype, mesh=None, rules=None):
  path = loading.resolve_dir(path, "text_encoder")
  cfg = GemmaConfig.from_transformers(loading.read_config(path, None))
  build = lambda: GemmaTextEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
  return loading.load_weights(path, build, TABLE, num_layers=cfg.num_hidden_layers, mesh=mesh, rules=rules,
                              weights_prefix="model")
