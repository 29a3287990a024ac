"""The shapes demo's text side: a word-level tokenizer and a tiny Gemma-2, pretrained as a causal LM.

    tokenizer = build_tokenizer(captions, "out/tokenizer")      # loads with sana_jax.text.load_tokenizer
    encoder = init_text_encoder(seed=0, vocab_size=len(tokenizer))
    encoder, metrics = pretrain_lm(encoder, tokenizer, captions, steps=300)

or `python -m sana_jax.demo.text_encoder --out DIR` (writes DIR/tokenizer and DIR/text_encoder). The
shipped encoder was then fine-tuned in place of a retrain, so the DiT trained on it stays usable:
`--resume SHIPPED --no-chi --side-targets --anchor 1` (see `caption_arrays` and `pretrain_lm`).

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
import functools
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sana_jax import files
from sana_jax.demo import shapes
from sana_jax.errors import ArgumentParser, cli_main
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
  files.write_json(path, {**files.read_json(path, "tokenizer config"), "tokenizer_class": name})


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


# "A {relation} B": where B lies from A, the word a relation caption's last token learns to predict
SIDE_OF_SECOND = {"left": "right", "right": "left", "above": "below", "below": "above"}


# how far `separate_relation_words` pushes each word of an opposite pair (above/below, left/right)
# from the other before a side-target fine-tune, as a fraction of the pair's mean embedding-row norm
# (0.5 still left some tiny test encoders' left/right merged)
RELATION_SPREAD = 1.0
RELATION_CAPTIONS = 32  # captions per pair that `separate_relation_words` measures the pair's effect on


@functools.partial(jax.jit, static_argnums=0)
def _relation_jacobians(graphdef, embed, rest, pairs, words, mask):
  """[P, D, D]: for each opposite pair (token ids pairs [P, 2]), d(the mean last-token state of its
  captions words [P, N, L], mask [P, N, L], after BOS) / d(a shift of both its embedding rows)."""
  table = jax.tree.leaves(embed)[0]

  def last_state(delta, pair, words, mask):
    model = nnx.merge(graphdef, jax.tree.map(lambda _: table.at[pair].add(delta), embed), rest)
    hidden = model(words, mask, model.encode_prefix(jnp.asarray([[BOS]], jnp.int32)))
    return hidden[jnp.arange(len(words)), mask.sum(axis=1) - 1].mean(0)

  return jax.vmap(jax.jacfwd(last_state), (None, 0, 0, 0))(jnp.zeros(table.shape[1]), pairs, words, mask)


def separate_relation_words(encoder, tokenizer, words, mask, spread=None):
  """The tied embeddings [V, D] of `encoder` with each opposite relation pair (a, b) pushed apart,
  a by +spread * the pair's mean row norm along a unit direction u, b by minus that. u is the
  direction in which the last-token state of the pair's captions (`words`, `mask` as from
  `caption_arrays`, after BOS) already reads the pair the right way round: with J = d(last-token
  state) / d(relation word's row), averaged over those captions, u maximises -u.J.u (the top
  eigenvector of -(J + J^T) / 2), so the side word each caption must predict (the opposite of its
  own, see SIDE_OF_SECOND) starts ahead of its own word instead of level with it. Deterministic
  (u's sign: along the rows' difference). A plain LM leaves each pair near-identical (the same words
  follow both), and the side-target fine-tune from that symmetric start told "left" from "right"
  only by chance; pushed along the rows' own difference or the top singular direction of J (half
  the time the wrong way round), the pairs still often merged again."""
  spread = RELATION_SPREAD if spread is None else spread
  table = jnp.asarray(encoder.embed_tokens[...])
  pairs = np.array([tokenizer.convert_tokens_to_ids(list(p)) for p in sorted({tuple(sorted(p)) for p in
                                                                                SIDE_OF_SECOND.items()})])
  rows = [np.nonzero(np.isin(words, p).any(axis=1))[0] for p in pairs]
  pairs, rows = pairs[[len(r) > 0 for r in rows]], [r for r in rows if len(r)]  # pairs the captions use
  if not spread or not rows:
    return table
  rows = np.stack([np.resize(r, RELATION_CAPTIONS) for r in rows])  # [pairs, N]: the first N, cycled if fewer
  graphdef, embed, rest = nnx.split(encoder, nnx.PathContains("embed_tokens"), ...)
  jac = np.asarray(_relation_jacobians(graphdef, embed, rest, jnp.asarray(pairs), jnp.asarray(words[rows]),
                                       jnp.asarray(mask[rows])), np.float64)
  out = np.array(table, np.float64)
  for k, (a, b) in enumerate(pairs):
    u = np.linalg.eigh(-(jac[k] + jac[k].T) / 2)[1][:, -1]
    u *= 1.0 if u @ (out[a] - out[b]) >= 0 else -1.0
    push = spread * (np.linalg.norm(out[a]) + np.linalg.norm(out[b])) / 2 * u
    out[a] += push
    out[b] -= push
  return jnp.asarray(out, table.dtype)


def caption_arrays(tokenizer, captions, side_targets=False):
  """Word ids W [N, L] (right-padded), mask [N, L], and next-token targets [N, L]: W shifted left, EOS
  after the last word. A prefix's last position predicts W[:, 0].

  side_targets: a relation caption's last word predicts the side of its second object (SIDE_OF_SECOND)
  instead of EOS. A plain causal LM has no use for telling "above" from "below" (the same words follow
  both), so it all but merges them, and the DiT sees two relations as one; this target makes the last
  token's state, which the DiT attends to, say where the object it names goes."""
  ids = [tokenizer.encode(c, add_special_tokens=False) for c in captions]
  n = max(len(i) for i in ids)
  words = np.full((len(ids), n), PAD, np.int32)
  targets = np.full((len(ids), n), PAD, np.int32)
  for row, (caption, seq) in enumerate(zip(captions, ids)):
    words[row, :len(seq)] = seq
    spec = shapes.parse(caption) if side_targets else None
    last = tokenizer.convert_tokens_to_ids(SIDE_OF_SECOND[spec.relation]) if spec and spec.relation else EOS
    targets[row, :len(seq)] = seq[1:] + [last]
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
                seed=0, side_targets=False, anchor=0.0, log_every=50, log=None):
  """Trains `encoder` in place as a causal LM on `captions` (after the CHI and after BOS alone, equally
  weighted). Returns (encoder, metrics) with the loss before and after on a fixed batch of captions.

  side_targets: see `caption_arrays`. anchor > 0 fine-tunes an encoder a DiT already uses: it adds
  `anchor` times the squared relative change of the output states (prefix and caption tokens), except
  at the relation words and at positions whose target `side_targets` changed, so the DiT's inputs move
  only where they must. (With the relation words anchored too, "left" and "right", whose embeddings
  the plain LM made near-identical, tend to stay merged.) side_targets first pushes each opposite
  relation pair's embeddings apart (`separate_relation_words`; the anchor's reference is the encoder
  as given). Progress goes to `log` (default: print)."""
  log = log or functools.partial(print, flush=True)
  words, mask, targets = caption_arrays(tokenizer, list(captions), side_targets=side_targets)
  # anchored: every token but the relation words (which must come apart too) and the side targets
  side = (np.arange(words.shape[1]) == mask.sum(axis=1, keepdims=True) - 1) & (targets != EOS)
  keep = mask * ~side * ~np.isin(words, tokenizer.convert_tokens_to_ids(list(SIDE_OF_SECOND)))
  prefixes = [jnp.asarray([[BOS]], jnp.int32)]
  if chi:
    prefixes.append(jnp.asarray([tokenizer.encode("\n".join(chi))], jnp.int32))
  graphdef, params = nnx.split(encoder)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(20, max(steps - 1, 1)), max(steps, 2), lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
  opt_state = tx.init(params)

  def outputs(params, words, mask):  # per prefix: (prefix states [1, P, D], caption states [B, L, D])
    model = nnx.merge(graphdef, params)
    cached = [model.encode_prefix(p) for p in prefixes]
    return [(c.hidden, model(words, mask, c)) for c in cached]

  def change(new, old, weight):
    return jnp.sum(weight * jnp.sum(jnp.square(new - old), -1) / jnp.sum(jnp.square(old), -1)) / jnp.sum(weight)

  if anchor:  # the starting encoder's states for every caption, per prefix
    chunks = [jax.jit(outputs)(params, words[i:i + 1024], mask[i:i + 1024]) for i in range(0, len(words), 1024)]
    reference = [(chunks[0][k][0], jnp.concatenate([c[k][1] for c in chunks])) for k in range(len(prefixes))]
  if side_targets:  # why: from near-identical relation words the fine-tune told them apart only by chance
    params["embed_tokens"].set_value(separate_relation_words(nnx.merge(graphdef, params), tokenizer, words, mask))

  def loss_fn(params, rows, words, mask, targets, keep):
    model = nnx.merge(graphdef, params)
    loss = sum(lm_loss(model, p, words, mask, targets) for p in prefixes) / len(prefixes)
    if anchor:
      for (prefix, hidden), (old_prefix, old_hidden) in zip(outputs(params, words, mask), reference):
        moved = change(prefix, old_prefix, jnp.ones(prefix.shape[:-1])) + change(hidden, old_hidden[rows], keep)
        loss += anchor * moved / len(prefixes)
    return loss

  @jax.jit
  def step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  fixed = rng.permutation(len(words))[:256]
  evaluate = jax.jit(loss_fn)
  eval_batch = (fixed, words[fixed], mask[fixed], targets[fixed], keep[fixed])
  before, start, curve = float(evaluate(params, *eval_batch)), time.time(), []
  for i in range(steps):
    rows = rng.integers(len(words), size=batch_size)
    params, opt_state, loss = step(params, opt_state, rows, words[rows], mask[rows], targets[rows], keep[rows])
    if i % log_every == 0 or i == steps - 1:
      curve.append((i, float(loss)))
      log(f"lm step {i:4d}  loss {float(loss):.4f}  {time.time() - start:5.1f} s")
  nnx.update(encoder, params)
  after = float(evaluate(params, *eval_batch))
  metrics = dict(steps=steps, loss_before=before, loss_after=after, losses=curve, train_seconds=time.time() - start)
  if side_targets:
    metrics["side_accuracy"] = side_accuracy(encoder, tokenizer, captions[:2048])
  return encoder, metrics


def side_accuracy(encoder, tokenizer, captions):
  """{relation: how often a relation caption's last token predicts its SIDE_OF_SECOND word} (after BOS)."""
  words, mask, targets = caption_arrays(tokenizer, captions, side_targets=True)
  hidden = encoder(jnp.asarray(words), jnp.asarray(mask), encoder.encode_prefix(jnp.asarray([[BOS]], jnp.int32)))
  last = mask.sum(axis=1) - 1
  rows = np.arange(len(words))
  right = np.asarray(jnp.argmax(encoder.lm_logits(hidden), -1))[rows, last] == targets[rows, last]
  specs = [shapes.parse(c) for c in captions]
  return {r: round(float(np.mean([ok for ok, s in zip(right, specs) if s and s.relation == r])), 4)
          for r in shapes.RELATIONS if any(s and s.relation == r for s in specs)}


# ---------------------------------------------------------------------------------------------
# CLI


def shapes_captions(n, seed=0):
  return [shapes.generate(i, seed, "train")[1] for i in range(n)]


@cli_main
def main(argv=None):
  p = ArgumentParser(prog="python -m sana_jax.demo.text_encoder", description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="writes OUT/tokenizer and OUT/text_encoder")
  p.add_argument("--steps", type=int, default=300, help="causal-LM pretraining steps (0: random weights)")
  p.add_argument("--captions", type=int, default=4096, help="training captions drawn from the generator")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--no-chi", action="store_true", help="pretrain after BOS alone (the shipped demo model runs "
                 "without the CHI), not also after it")
  p.add_argument("--side-targets", action="store_true", help="relation captions' last word predicts where the "
                 "second object lies (see caption_arrays)")
  p.add_argument("--resume", help="fine-tune DIR/tokenizer + DIR/text_encoder instead of starting from scratch")
  p.add_argument("--anchor", type=float, default=0.0, help="with --resume: weight of the penalty on changing "
                 "the output states a DiT was trained on")
  args = p.parse_args(argv)
  files.output_directory(args.out, "--out")
  captions = shapes_captions(args.captions, args.seed)
  if args.resume:
    shutil.copytree(os.path.join(args.resume, "tokenizer"), os.path.join(args.out, "tokenizer"), dirs_exist_ok=True)
    tokenizer = load_tokenizer(os.path.join(args.out, "tokenizer"))
    encoder = GemmaTextEncoder.from_pretrained(os.path.join(args.resume, "text_encoder"))
  else:
    tokenizer = build_tokenizer(captions, os.path.join(args.out, "tokenizer"))
    encoder = init_text_encoder(args.seed, len(tokenizer))
  metrics = {}
  if args.steps:
    encoder, metrics = pretrain_lm(encoder, tokenizer, captions, args.steps, batch_size=args.batch_size, lr=args.lr,
                                   chi=() if args.no_chi else COMPLEX_HUMAN_INSTRUCTION, seed=args.seed,
                                   side_targets=args.side_targets, anchor=args.anchor)
  encoder.save_pretrained(os.path.join(args.out, "text_encoder"))
  files.write_json(os.path.join(args.out, "text_encoder_metrics.json"), dict(metrics, vocab_size=len(tokenizer)),
                   indent=1)
  print(f"vocab {len(tokenizer)}; LM loss {metrics.get('loss_before', float('nan')):.3f} -> "
        f"{metrics.get('loss_after', float('nan')):.3f}; side accuracy {metrics.get('side_accuracy')}; "
        f"saved {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
