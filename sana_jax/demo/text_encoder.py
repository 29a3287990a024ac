"""The shapes demo's text side: a word-level tokenizer and a tiny Gemma-2, pretrained as a causal LM.

    tokenizer = build_tokenizer(captions, "out/tokenizer")      # loads with sana_jax.text.load_tokenizer
    encoder = init_text_encoder(seed=0, vocab_size=len(tokenizer))
    encoder, metrics = pretrain_lm(encoder, tokenizer, captions, steps=300)

or `python -m sana_jax.demo.text_encoder --out DIR` (writes DIR/tokenizer and DIR/text_encoder).

Token ids are Gemma's special ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3; BOS is prepended, no EOS, right
padding, as Gemma's tokenizer and our PromptEncoder use them. Then every word of the caption grammar,
in a fixed order (so held-out pairs such as "a purple circle" tokenise: the words exist, the pair was
never seen), then other caption words, then the words of the complex human instruction (CHI).

CHI: the demo model is meant to run without it (SanaPipeline(complex_human_instruction=()), recorded
for a shipped model in model_index.json's "sana_jax" settings): a word-level vocabulary over shapes
captions has nothing to gain from the instruction, and short sequences keep the DiT's cross-attention
cheap. Paths that still prepend it by default (diffusers' SanaPipeline, unless given
complex_human_instruction=None) must not crash or fill up with <unk>, so the vocabulary covers the
CHI's words too, and the LM is pretrained on captions after BOS alone and after the CHI, equally
weighted, so hidden states carry word identity and order in either mode. The DiT must be trained and
sampled in the same mode.
"""
import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sana_jax.demo import shapes
from sana_jax.models.gemma import GemmaConfig, GemmaTextEncoder
from sana_jax.text import COMPLEX_HUMAN_INSTRUCTION, load_tokenizer

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3, Gemma's
PAD, EOS, BOS, UNK = range(4)
# every word the caption grammar can say, in a fixed order: their ids never depend on the captions
GRAMMAR_WORDS = tuple(dict.fromkeys(
    ["a", *shapes.SIZE_RANGES, *shapes.COLOURS, *shapes.SHAPES, *(s + "s" for s in shapes.SHAPES),
     *shapes.NUMBERS.values(), *" ".join(shapes.RELATIONS.values()).split()]))


def _pre_tokenizer():
  from tokenizers import normalizers, pre_tokenizers
  return normalizers.Lowercase(), pre_tokenizers.Whitespace()


def words_of(texts):
  """The words the tokenizer sees in `texts`: lower-cased, split on whitespace and punctuation."""
  normalizer, pre = _pre_tokenizer()
  return [w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))]


def vocabulary(captions_or_vocab=(), chi=COMPLEX_HUMAN_INSTRUCTION):
  """Specials, grammar words, then new words of the captions (sorted), then CHI words (sorted)."""
  vocab = list(SPECIAL_TOKENS) + list(GRAMMAR_WORDS)
  for extra in (words_of(captions_or_vocab), words_of(["\n".join(chi)] if chi else [])):
    vocab += sorted(set(extra) - set(vocab))
  return vocab


def build_tokenizer(captions_or_vocab, directory, chi=COMPLEX_HUMAN_INSTRUCTION):
  """A WordLevel tokenizer saved to `directory` as a transformers tokenizer; returns it as
  `sana_jax.text.load_tokenizer(directory)` loads it."""
  from tokenizers import Tokenizer, models, processors
  from transformers import PreTrainedTokenizerFast
  vocab = vocabulary(captions_or_vocab, chi)
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
  tok.normalizer, tok.pre_tokenizer = _pre_tokenizer()
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                     special_tokens=[("<bos>", BOS)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>", padding_side="right", model_max_length=1024,
                                 add_bos_token=True, add_eos_token=False)
  fast.save_pretrained(directory)
  _set_tokenizer_class(directory, "PreTrainedTokenizerFast")
  return load_tokenizer(directory)


def _set_tokenizer_class(directory, name):
  """transformers 5 writes its new backend name, which transformers 4 (and diffusers on it) cannot
  resolve; the old name loads the same tokenizer.json in both."""
  path = os.path.join(directory, "tokenizer_config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  config["tokenizer_class"] = name
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)


def tiny_gemma_config(vocab_size):
  """Gemma-2's architecture at toy size: hidden 64, 2 layers (sliding + global), 2 heads x 32, 1 KV head."""
  return GemmaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                     sliding_window=1024).validated()


def init_text_encoder(seed=0, vocab_size=None):
  """A randomly initialised tiny GemmaTextEncoder (vocab_size: len(tokenizer); default the grammar + CHI)."""
  return GemmaTextEncoder(tiny_gemma_config(vocab_size or len(vocabulary())), rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------
# causal-LM pretraining


def caption_arrays(tokenizer, captions):
  """Word ids W [N, L] (right-padded), mask [N, L], and next-token targets [N, L]: W shifted left, EOS
  after the last word. A prefix's last position predicts W[:, 0]."""
  ids = [tokenizer.encode(c, add_special_tokens=False) for c in captions]
  n = max(len(i) for i in ids)
  words = np.full((len(ids), n), PAD, np.int32)
  targets = np.full((len(ids), n), PAD, np.int32)
  for row, seq in enumerate(ids):
    words[row, :len(seq)] = seq
    targets[row, :len(seq)] = seq[1:] + [EOS]
  return words, (words != PAD).astype(np.int32), targets


def lm_loss(encoder, prefix_ids, words, mask, targets):
  """Mean next-token cross-entropy over a caption batch continuing `prefix_ids` [1, P] (BOS, or the
  tokenized CHI), computed through the prefix cache as PromptEncoder encodes."""
  prefix = encoder.encode_prefix(prefix_ids)
  hidden = encoder(words, mask, prefix)
  ce = optax.softmax_cross_entropy_with_integer_labels
  first = -jax.nn.log_softmax(encoder.lm_logits(prefix.hidden[:, -1:])[0, 0])[words[:, 0]]  # one prefix, B rows
  rest = ce(encoder.lm_logits(hidden), targets) * mask
  return (first.sum() + rest.sum()) / (len(words) + mask.sum())


def pretrain_lm(encoder, tokenizer, captions, steps=300, *, chi=COMPLEX_HUMAN_INSTRUCTION, batch_size=32, lr=3e-3,
                seed=0, log_every=50, log=functools.partial(print, flush=True)):
  """Trains `encoder` in place as a causal LM on `captions` (after the CHI and after BOS alone, equally
  weighted). Returns (encoder, metrics) with the loss before and after on a fixed batch of captions."""
  words, mask, targets = caption_arrays(tokenizer, list(captions))
  prefixes = [jnp.asarray([[BOS]], jnp.int32)]
  if chi:
    prefixes.append(jnp.asarray([tokenizer.encode("\n".join(chi))], jnp.int32))
  graphdef, params = nnx.split(encoder)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(20, max(steps - 1, 1)), max(steps, 2), lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
  opt_state = tx.init(params)

  def loss_fn(params, *batch):
    model = nnx.merge(graphdef, params)
    return sum(lm_loss(model, p, *batch) for p in prefixes) / len(prefixes)

  @jax.jit
  def step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  fixed = rng.permutation(len(words))[:256]
  evaluate = jax.jit(loss_fn)
  eval_batch = (words[fixed], mask[fixed], targets[fixed])
  before, start, curve = float(evaluate(params, *eval_batch)), time.time(), []
  for i in range(steps):
    rows = rng.integers(len(words), size=batch_size)
    params, opt_state, loss = step(params, opt_state, words[rows], mask[rows], targets[rows])
    if i % log_every == 0 or i == steps - 1:
      curve.append((i, float(loss)))
      log(f"lm step {i:4d}  loss {float(loss):.4f}  {time.time() - start:5.1f} s")
  nnx.update(encoder, params)
  after = float(evaluate(params, *eval_batch))
  return encoder, dict(steps=steps, loss_before=before, loss_after=after, losses=curve,
                       train_seconds=time.time() - start)


# ---------------------------------------------------------------------------------------------
# CLI


def shapes_captions(n, seed=0):
  return [shapes.generate(i, seed, "train")[1] for i in range(n)]


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m sana_jax.demo.text_encoder", description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="writes OUT/tokenizer and OUT/text_encoder")
  p.add_argument("--steps", type=int, default=300, help="causal-LM pretraining steps (0: random weights)")
  p.add_argument("--captions", type=int, default=4096, help="training captions drawn from the generator")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  captions = shapes_captions(args.captions, args.seed)
  tokenizer = build_tokenizer(captions, os.path.join(args.out, "tokenizer"))
  encoder = init_text_encoder(args.seed, len(tokenizer))
  metrics = {}
  if args.steps:
    encoder, metrics = pretrain_lm(encoder, tokenizer, captions, args.steps, seed=args.seed)
  encoder.save_pretrained(os.path.join(args.out, "text_encoder"))
  with open(os.path.join(args.out, "text_encoder_metrics.json"), "w") as f:
    json.dump(dict(metrics, vocab_size=len(tokenizer)), f, indent=1)
  print(f"vocab {len(tokenizer)}; LM loss {metrics.get('loss_before', float('nan')):.3f} -> "
        f"{metrics.get('loss_after', float('nan')):.3f}; saved {args.out}")


if __name__ == "__main__":
  main()
