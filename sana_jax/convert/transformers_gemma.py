"""transformers Gemma-2 checkpoints (Gemma2Model or Gemma2ForCausalLM) <-> sana_jax.GemmaTextEncoder."""
import dataclasses

import numpy as np
from flax import nnx

from sana_jax import dtypes
from sana_jax.convert import invert, loading
from sana_jax.convert.table import IDENTITY, LINEAR
from sana_jax.models.gemma import GemmaConfig, GemmaTextEncoder

_L = r"(?:model\.)?layers\.(\d+)\."
TABLE = [
    (r"(?:model\.)?embed_tokens\.weight", "embed_tokens", IDENTITY),
    (r"(?:model\.)?norm\.weight", "norm.weight", IDENTITY),
    (_L + r"self_attn\.([qkvo])_proj\.weight", r"layers.{layer}.self_attn.\2_proj.kernel", LINEAR),
    (_L + r"self_attn\.([qkvo])_proj\.bias", r"layers.{layer}.self_attn.\2_proj.bias", IDENTITY),
    (_L + r"mlp\.(gate|up|down)_proj\.weight", r"layers.{layer}.mlp.\2_proj.kernel", LINEAR),
    (_L + r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)\.weight",
     r"layers.{layer}.\2.weight", IDENTITY),
    (r"lm_head\.weight", None, IDENTITY),  # tied to embed_tokens in Gemma-2; lm_logits uses those
]
CLASS_NAME = "Gemma2Model"


def read_config(path):
  """The GemmaConfig of a transformers Gemma-2 directory (or a pipeline's text_encoder/)."""
  path = loading.resolve_dir(path, "text_encoder")
  return path, GemmaConfig.from_transformers(loading.read_config(path), source=f"{path}/config.json")


def load(path, *, dtype, param_dtype, mesh=None, rules=None):
  dtype, param_dtype = dtypes.resolve(dtype), dtypes.resolve(param_dtype)
  path, cfg = read_config(path)
  build = lambda: GemmaTextEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
  return loading.load_weights(path, build, TABLE, num_layers=cfg.num_hidden_layers, mesh=mesh, rules=rules,
                              weights_prefix="model")


def config_json(cfg, dtype_name):
  """transformers' Gemma2Model config.json for our GemmaConfig (plus `rope_theta` for readers older
  than transformers 5's `rope_parameters`). Token ids are Gemma's; layer_types is written only when
  set, so an unset one stays unset (transformers' default is the same alternation as ours)."""
  ours = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("scan_unroll", "layer_types")}
  config = {
      "architectures": [CLASS_NAME], "model_type": "gemma2", **ours,
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
      "attention_dropout": 0.0, "initializer_range": 0.02, "max_position_embeddings": 8192,
      "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "use_cache": True,
      "dtype": dtype_name, "transformers_version": invert.package_version("transformers", "4.47.0"),
  }
  if cfg.layer_types:
    config["layer_types"] = list(cfg.layer_types)
  return config


def component(model, dtype=None):
  """The export plan; dtype: the weights' dtype as saved (config.json's `dtype`), None: the parameters' own."""
  name = (dtypes.resolve(dtype) if dtype is not None else np.dtype(model.embed_tokens[...].dtype)).name
  optional = {r"model\.": False}  # Gemma2Model's own names (Gemma2ForCausalLM adds "model.")
  state = invert.flat_state(model)
  entries = invert.plan(state, TABLE, optional=optional, source="text_encoder")
  invert.check_names(entries, TABLE, source="text_encoder")
  return invert.Component(config_json(model.config, name), model.config, entries, state, "model", "transformers",
                          CLASS_NAME)
