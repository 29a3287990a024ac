"""Prompt safety checks, off by default: a ShieldGemma-style classifier run on our Gemma-2, and an
offline word list that needs no weights. An unsafe prompt is replaced by SAFE_REPLACEMENT."""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

SAFE_REPLACEMENT = "A red heart."
DEFAULT_THRESHOLD = 0.2

# The classifier's question, in the layout ShieldGemma was trained on (turn markers around the prompt,
# then the policy, then a Yes/No question); the policy wording is ours.
TEMPLATE = """You are a policy expert trying to help determine whether a user prompt is in violation of the defined safety policies.

<start_of_turn>
Human Question: {prompt}
<end_of_turn>

Our safety principle is defined in the below:

{policy}

Does the human question violate the above principle? Your answer must start with 'Yes' or 'No'. And then walk through step by step to be sure we answer correctly.
"""
POLICY = "\n".join([
    '* "No Dangerous Content": the prompt shall not ask for images that help cause real-world harm.',
    '* "No Harassment": the prompt shall not ask for images that threaten, bully or demean a person.',
    '* "No Hate Speech": the prompt shall not ask for images that attack people for who they are.',
    '* "No Sexually Explicit Information": the prompt shall not ask for sexually explicit images.',
])

# A deliberately small offline list: whole words (or word starts, marked by a trailing *) that flag a prompt.
BLOCKED_WORDS = ("nsfw", "porn*", "nude", "nudity", "naked", "sexual*", "gore", "gory", "beheading", "decapitat*",
                 "dismember*", "child abuse", "terrorist attack", "mass shooting", "self-harm", "suicide")
_BLOCKED = re.compile(r"\b(?:" + "|".join(re.escape(w.rstrip("*")) + (r"\w*" if w.endswith("*") else r"\b")
                                          for w in BLOCKED_WORDS) + ")", re.IGNORECASE)


def wordlist_flags(prompts):
  """True for each prompt containing a blocked word."""
  return [bool(_BLOCKED.search(p)) for p in prompts]


class ShieldClassifier:
  """P("Yes" | policy question about the prompt) from the last-token logits of a Gemma-2 classifier."""

  def __init__(self, tokenizer, model, *, threshold=DEFAULT_THRESHOLD, policy=POLICY):
    tokenizer.padding_side = "right"
    self.tokenizer, self.threshold, self.policy = tokenizer, threshold, policy
    self.yes_no = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No")]
    graphdef, self._state = nnx.split(model)

    def yes_probability(state, ids, mask, yes_no):
      m = nnx.merge(graphdef, state)
      last = jnp.sum(mask, axis=1) - 1  # the last real token of each right-padded row
      hidden = m(ids, mask)[jnp.arange(ids.shape[0]), last][:, None]
      logits = m.lm_logits(hidden)[:, 0, yes_no]
      return jax.nn.softmax(logits, axis=-1)[:, 0]

    self._yes_probability = jax.jit(yes_probability)

  def probabilities(self, prompts):
    texts = [TEMPLATE.format(prompt=p, policy=self.policy) for p in prompts]
    tokens = self.tokenizer(texts, padding="longest", return_tensors="np")
    return np.asarray(self._yes_probability(self._state, jnp.asarray(tokens["input_ids"]),
                                            jnp.asarray(tokens["attention_mask"]), jnp.asarray(self.yes_no)))


def make_safe(prompts, classifier=None, use_wordlist=True):
  """Prompts with unsafe ones replaced by SAFE_REPLACEMENT (and a warning), and the indices replaced."""
  prompts = list(prompts)
  flags = wordlist_flags(prompts) if use_wordlist else [False] * len(prompts)
  if classifier is not None:
    flags = [f or bool(p > classifier.threshold) for f, p in zip(flags, classifier.probabilities(prompts))]
  replaced = [i for i, f in enumerate(flags) if f]
  for i in replaced:
    log.warning("prompt %d looks unsafe and was replaced by %r", i, SAFE_REPLACEMENT)
    prompts[i] = SAFE_REPLACEMENT
  return prompts, replaced
