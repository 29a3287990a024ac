"""PromptEncoder vs diffusers' SanaPipeline.encode_prompt on a tiny tokenizer + Gemma-2 saved to disk."""
import diffusers
import numpy as np
import pytest
import torch
import transformers
from reference import byte_bpe_tokenizer, rel_err, shift_off_init

import sana_jax
from sana_jax.text import COMPLEX_HUMAN_INSTRUCTION, PromptEncoder, load_tokenizer

PROMPTS = [
    "A Red Fox JUMPING over a Lazy Dog  ",
    "a cat 🐱 sitting on a 🌙, with sparkles ✨",
    "山の上の赤い鳥居と桜 — a torii gate",
    "an extremely long prompt " + "with many many repeated descriptive words " * 12,
]
MAX_LEN = 24


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A byte-level BPE tokenizer (any unicode) and a tiny random Gemma-2, both in the official formats."""
  root = tmp_path_factory.mktemp("textenc")
  fast = byte_bpe_tokenizer(list(COMPLEX_HUMAN_INSTRUCTION) + [p.lower() for p in PROMPTS], 400)
  fast.save_pretrained(root / "tokenizer")
  torch.manual_seed(0)
  config = transformers.Gemma2Config(vocab_size=len(fast), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                     query_pre_attn_scalar=16, sliding_window=16, max_position_embeddings=1024,
                                     pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager")
  model = shift_off_init(transformers.Gemma2Model(config).eval(), seed=0)
  model.save_pretrained(root / "text_encoder")
  pipe = diffusers.SanaPipeline(tokenizer=fast, text_encoder=model, vae=None, transformer=None, scheduler=None)
  return root, pipe


def test_matches_diffusers_encode_prompt(reference):
  root, pipe = reference
  with torch.no_grad():
    ref = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, negative_prompt="Blurry, LOW quality",
                             device="cpu", max_sequence_length=MAX_LEN,
                             complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION))
  encoder = PromptEncoder(load_tokenizer(root), sana_jax.GemmaTextEncoder.from_pretrained(root),
                          max_sequence_length=MAX_LEN)
  ours = encoder.encode(PROMPTS, negative_prompt="Blurry, LOW quality")
  for got, want, name in zip(ours, ref, ["embeds", "mask", "negative embeds", "negative mask"]):
    want = want.numpy()
    assert got.shape == want.shape, name
    if "mask" in name:
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
    else:
      assert rel_err(np.asarray(got), want) <= 1e-4, name
  mask = np.asarray(ours[1])
  assert mask[3].all() and not mask[0].all()  # the long prompt fills every position, the short one pads


def test_chi_prefix_reuse_equals_one_pass(reference):
  """Encoding after the cached CHI prefix gives the one-pass result, and the cache is really used."""
  root, _ = reference
  model = sana_jax.GemmaTextEncoder.from_pretrained(root)
  reuse = PromptEncoder(load_tokenizer(root), model, max_sequence_length=MAX_LEN)
  once = PromptEncoder(load_tokenizer(root), model, max_sequence_length=MAX_LEN, reuse_prefix=False)
  a, b = reuse.encode_positive(PROMPTS), once.encode_positive(PROMPTS)
  assert len(reuse._prefixes) == 1 and not once._prefixes
  shared = next(iter(reuse._prefixes))
  assert len(reuse.chi_ids) - 1 <= shared <= len(reuse.chi_ids)
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  assert rel_err(np.asarray(a[0]), np.asarray(b[0])) <= 1e-5


def test_truncation_warns_and_chi_can_be_switched_off(reference, caplog):
  root, pipe = reference
  encoder = PromptEncoder(load_tokenizer(root), sana_jax.GemmaTextEncoder.from_pretrained(root),
                          max_sequence_length=MAX_LEN, complex_human_instruction=None)
  with caplog.at_level("WARNING"):
    embeds, mask, _, _ = encoder.encode(PROMPTS[3:], do_classifier_free_guidance=False)
  assert "truncated" in caplog.text
  with torch.no_grad():
    ref_embeds, ref_mask, _, _ = pipe.encode_prompt(PROMPTS[3:], do_classifier_free_guidance=False, device="cpu",
                                                    max_sequence_length=MAX_LEN, complex_human_instruction=None)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask.numpy())
  assert rel_err(np.asarray(embeds), ref_embeds.numpy()) <= 1e-4


def test_original_style(reference):
  """The original repository: no lower-casing, null embedding without CHI sharing the prompt mask."""
  root, _ = reference
  encoder = PromptEncoder(load_tokenizer(root), sana_jax.GemmaTextEncoder.from_pretrained(root),
                          max_sequence_length=MAX_LEN, style="original")
  embeds, mask, neg, neg_mask = encoder.encode(["A Red Fox", "a red fox"])
  assert rel_err(np.asarray(embeds[0]), np.asarray(embeds[1])) > 1e-3  # case is kept
  np.testing.assert_array_equal(np.asarray(neg_mask), np.asarray(mask))
  null, _ = encoder.encode_negative([""])
  assert rel_err(np.asarray(neg[1]), np.asarray(null[0])) <= 1e-6
