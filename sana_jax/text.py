"""Sana's prompt encoding: tokenizer + complex human instruction (CHI) + Gemma-2 + token selection.

`PromptEncoder.encode(prompts, negative_prompt)` returns (embeds, mask, negative embeds, negative
mask) exactly as diffusers' `SanaPipeline.encode_prompt` does (style="diffusers", the default), or as
the original NVlabs repository does (style="original"): no lower-casing, and the unconditional branch
is the null (empty-prompt) embedding without CHI, sharing the conditional branch's mask.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sana_jax.errors import SanaError, one_line

log = logging.getLogger(__name__)

# The instruction Sana prepends to every prompt (diffusers' SanaPipeline default; the same text as
# the original repository's config), one line per entry, joined with newlines.
COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
)
STYLES = ("diffusers", "original")
MAX_SEQUENCE_LENGTH = 4096  # Sana uses 300; Gemma-2 was trained on 8192 positions, the CHI included


def load_tokenizer(path_or_id):
  """AutoTokenizer from a local directory (or a pipeline's tokenizer/); a hub id only if given and online."""
  import os

  # transformers advises at import that PyTorch is missing: we only use its tokenizers
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  from transformers import AutoTokenizer
  path = os.fspath(path_or_id)
  if os.path.isdir(os.path.join(path, "tokenizer")):
    path = os.path.join(path, "tokenizer")
  try:  # a local directory is never looked up on the hub
    return AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))
  except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions for damaged files
    raise SanaError(f"cannot load a tokenizer from {path_or_id}: {one_line(e, 200) or type(e).__name__}") from None


class PromptEncoder:
  """Encodes prompt batches with one jitted text-encoder call per batch and shape."""

  def __init__(self, tokenizer, text_encoder, *, max_sequence_length=300,
               complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION, style="diffusers", reuse_prefix=True):
    if style not in STYLES:
      raise SanaError(f"prompt encoding style {style!r}; expected one of {STYLES}")
    if not isinstance(max_sequence_length, int) or not 2 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
      raise SanaError(f"max_sequence_length {max_sequence_length!r}: expected an integer from 2 to "
                      f"{MAX_SEQUENCE_LENGTH}")
    tokenizer.padding_side = "right"
    self.tokenizer, self.style, self.max_sequence_length = tokenizer, style, max_sequence_length
    self.chi = "\n".join(complex_human_instruction) if complex_human_instruction else ""
    self.chi_ids = np.asarray(tokenizer.encode(self.chi)) if self.chi else np.zeros(0, int)
    # Causal attention makes the CHI tokens' keys, values and outputs the same for every prompt, so
    # they are computed once (per shared length) and each batch runs only the tokens after them.
    self.reuse_prefix, self._prefixes = reuse_prefix, {}
    self.text_encoder = text_encoder
    graphdef, state = nnx.split(text_encoder)
    self._state = state
    self._forward = jax.jit(lambda state, ids, mask, prefix: nnx.merge(graphdef, state)(ids, mask, prefix))
    self._encode_prefix = jax.jit(lambda state, ids: nnx.merge(graphdef, state).encode_prefix(ids))

  def _preprocess(self, prompts):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return prompts if self.style == "original" else [p.lower().strip() for p in prompts]

  def _tokenize(self, texts, max_length):
    """Right-padded, truncated token ids and mask [B, max_length]; warns about truncated prompts."""
    tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                            add_special_tokens=True, return_tensors="np")
    for text, ids in zip(texts, self.tokenizer(texts, add_special_tokens=True)["input_ids"]):
      if len(ids) > max_length:
        log.warning("prompt truncated to %d tokens (%d dropped): %r", max_length, len(ids) - max_length,
                    text[-80:])
    return np.asarray(tokens["input_ids"]), np.asarray(tokens["attention_mask"])

  def _embed(self, ids, mask):
    """(hidden states [B, T, D], mask) of tokens [B, T], reusing the cached CHI prefix where they allow."""
    shared = self._shared_prefix_length(ids)
    if not shared:
      return self._forward(self._state, jnp.asarray(ids), jnp.asarray(mask), None), jnp.asarray(mask)
    if shared not in self._prefixes:
      self._prefixes[shared] = self._encode_prefix(self._state, jnp.asarray(self.chi_ids[None, :shared]))
    prefix = self._prefixes[shared]
    rest = self._forward(self._state, jnp.asarray(ids[:, shared:]), jnp.asarray(mask[:, shared:]), prefix)
    head = jnp.broadcast_to(prefix.hidden.astype(rest.dtype), (len(ids), *prefix.hidden.shape[1:]))
    return jnp.concatenate([head, rest], axis=1), jnp.asarray(mask)

  def _shared_prefix_length(self, ids):
    """How many leading tokens every row shares with the tokenized CHI (0: no reuse). The last CHI
    token can merge with a prompt's first characters, so this may be one short of the CHI's length."""
    n = min(len(self.chi_ids), ids.shape[1] - 1)
    if not (self.reuse_prefix and n > 0):
      return 0
    same = np.cumprod(ids[:, :n] == self.chi_ids[None, :n], axis=1)
    return int(same.sum(axis=1).min())

  def positive_tokens(self, prompts):
    """What encode_positive runs the text encoder on: token ids and mask [B, T] (the CHI, then the
    prompt), and the positions [max_sequence_length] it keeps: BOS + the last max_sequence_length - 1."""
    texts = self._preprocess(prompts)
    max_length = self.max_sequence_length
    if self.chi:
      texts = [self.chi + t for t in texts]
      max_length = len(self.tokenizer.encode(self.chi)) + self.max_sequence_length - 2
    ids, mask = self._tokenize(texts, max_length)
    return ids, mask, np.concatenate([[0], np.arange(max_length - self.max_sequence_length + 1, max_length)])

  def encode_positive(self, prompts):
    """Prompt embeddings [B, max_sequence_length, D] and mask: BOS + the last max_sequence_length - 1."""
    ids, mask, keep = self.positive_tokens(prompts)
    embeds, mask = self._embed(ids, mask)
    return embeds[:, keep], mask[:, keep]

  def encode_negative(self, negative_prompts):
    """Unconditional embeddings: no CHI, max_sequence_length tokens, no selection."""
    ids, mask = self._tokenize(self._preprocess(negative_prompts), self.max_sequence_length)
    return self._forward(self._state, jnp.asarray(ids), jnp.asarray(mask), None), jnp.asarray(mask)

  def encode(self, prompts, negative_prompt="", do_classifier_free_guidance=True):
    """(embeds, mask, negative embeds, negative mask); the negatives are None without guidance."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    embeds, mask = self.encode_positive(prompts)
    if not do_classifier_free_guidance:
      return embeds, mask, None, None
    if self.style == "original":  # the null embedding, with the conditional mask
      neg, _ = self.encode_negative([""] * len(prompts))
      return embeds, mask, neg, mask
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
      raise SanaError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    neg, neg_mask = self.encode_negative(negatives)
    return embeds, mask, neg, neg_mask
