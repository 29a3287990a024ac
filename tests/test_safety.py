"""The safety check's mechanics, with a tiny random classifier (no real ShieldGemma weights here)."""
import pytest
import torch
import transformers
from test_prompt_encoding import reference  # noqa: F401 - the tokenizer + Gemma-2 fixture

import sana_jax
from sana_jax import safety
from sana_jax.text import load_tokenizer


def test_wordlist():
  flags = safety.wordlist_flags(["a red fox", "NSFW photo", "pornographic scene", "a nudibranch", "gorge"])
  assert flags == [False, True, True, False, False]


@pytest.fixture(scope="module")
def classifier_dir(reference, tmp_path_factory):  # noqa: F811
  root, pipe = reference
  out = tmp_path_factory.mktemp("shield")
  lm = transformers.Gemma2ForCausalLM(pipe.text_encoder.config).eval()
  lm.model.load_state_dict(pipe.text_encoder.state_dict())
  lm.save_pretrained(out)
  load_tokenizer(root).save_pretrained(out)
  return out, lm


def test_yes_probability_matches_transformers(classifier_dir):
  path, lm = classifier_dir
  tok = load_tokenizer(path)
  clf = safety.ShieldClassifier(tok, sana_jax.GemmaTextEncoder.from_pretrained(path))
  prompts = ["a red fox", "a cat on the moon with sparkles"]
  got = clf.probabilities(prompts)
  yes, no = clf.yes_no
  for prompt, p in zip(prompts, got):  # one at a time, no padding: the plain reference computation
    ids = tok(safety.TEMPLATE.format(prompt=prompt, policy=safety.POLICY), return_tensors="pt").input_ids
    with torch.no_grad():
      logits = lm(ids).logits[0, -1, [yes, no]]
    assert abs(float(torch.softmax(logits, -1)[0]) - p) < 1e-5
  assert ((0 < got) & (got < 1)).all()


def test_make_safe_replaces_and_says_so(classifier_dir, caplog):
  path, _ = classifier_dir
  clf = safety.ShieldClassifier(load_tokenizer(path), sana_jax.GemmaTextEncoder.from_pretrained(path))
  prompts = ["a red fox", "nsfw art"]
  with caplog.at_level("WARNING"):
    out, replaced = safety.make_safe(prompts)  # word list only
  assert out == ["a red fox", safety.SAFE_REPLACEMENT] and replaced == [1] and "replaced" in caplog.text
  clf.threshold = 0.0  # every probability is above 0: all replaced
  assert safety.make_safe(prompts, clf)[1] == [0, 1]
  clf.threshold = 1.0  # none above 1: only the word list fires
  assert safety.make_safe(prompts, clf)[1] == [1]
  assert safety.make_safe(prompts, clf, use_wordlist=False)[1] == []
