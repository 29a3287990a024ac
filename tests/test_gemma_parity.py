"""GemmaTextEncoder vs transformers' Gemma2Model on tiny random configs shifted off init."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from reference import rel_err, shift_off_init

import sana_jax

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=64)


def make_reference(tmp_path, seed=0, causal_lm=False, **overrides):
  torch.manual_seed(seed)
  config = transformers.Gemma2Config(**{**TINY, **overrides}, attn_implementation="eager")
  cls = transformers.Gemma2ForCausalLM if causal_lm else transformers.Gemma2Model
  ref = cls(config).eval()
  shift_off_init(ref, seed=seed)
  ref.save_pretrained(tmp_path)
  return ref


def inputs(batch=2, length=13, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, TINY["vocab_size"], (batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[0, 9:] = 0  # right padding, as Sana's tokenizer pads
  ids[0, 9:] = 0
  return ids, mask


@pytest.mark.parametrize("overrides", [dict(sliding_window=4), dict(sliding_window=64, attn_logit_softcapping=None)],
                         ids=["window_shorter_than_sequence", "no_softcap_long_window"])
def test_matches_transformers_float32(tmp_path, overrides):
  ref = make_reference(tmp_path, **overrides)
  ours = sana_jax.GemmaTextEncoder.from_pretrained(tmp_path)
  ids, mask = inputs()
  with torch.no_grad():
    expected = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  valid = mask.astype(bool)  # padded positions are don't-care for Sana (masked out downstream) but compared too
  assert rel_err(got[valid], expected[valid]) <= 1e-4
  assert rel_err(got, expected) <= 1e-4


def test_causal_lm_checkpoint_and_logits(tmp_path):
  """A Gemma2ForCausalLM directory loads (lm_head is tied) and gives the same next-token logits."""
  ref = make_reference(tmp_path, causal_lm=True, sliding_window=4)
  ours = sana_jax.GemmaTextEncoder.from_pretrained(tmp_path)
  ids, mask = inputs()
  with torch.no_grad():
    expected = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  got = np.asarray(ours.lm_logits(ours(jnp.asarray(ids), jnp.asarray(mask))))
  assert rel_err(got, expected) <= 1e-4


def test_bfloat16_close_to_float32(tmp_path):
  ref = make_reference(tmp_path, sliding_window=4)
  ids, mask = inputs()
  with torch.no_grad():
    expected = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  ours = sana_jax.GemmaTextEncoder.from_pretrained(tmp_path, dtype=jnp.bfloat16)
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
  assert rel_err(got, expected) <= 3e-2


@pytest.mark.skipif(len(__import__("jax").devices()) < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")
def test_sharded_weights_same_hidden_states(tmp_path):
  import jax
  from jax.sharding import PartitionSpec as P

  from sana_jax import parallel
  make_reference(tmp_path, sliding_window=4)
  single = sana_jax.GemmaTextEncoder.from_pretrained(tmp_path)
  mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
  sharded = sana_jax.GemmaTextEncoder.from_pretrained(tmp_path, mesh=mesh)
  q = sharded.layers.self_attn.q_proj.kernel[...]  # [layers, hidden 48, heads * hd 64]
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  assert sharded.layers.mlp.down_proj.kernel[...].sharding.spec == P(None, "tensor", "fsdp")
  ids, mask = inputs(batch=4)
  got = jax.jit(lambda m, i, a: m(i, a))(sharded, jnp.asarray(ids), jnp.asarray(mask))
  assert rel_err(np.asarray(got), np.asarray(single(jnp.asarray(ids), jnp.asarray(mask)))) <= 1e-5
