"""Helpers for parity tests against the PyTorch reference implementations."""
import numpy as np
import torch


def shift_off_init(module, seed=0, scale=0.1):
  """Adds seeded noise to every parameter so parity cannot hold by accident (zeros, ones, init)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
  return module


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def nchw_to_nhwc(t):
  return np.asarray(t.detach().float().numpy()).transpose(0, 2, 3, 1)


def nhwc_to_nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def byte_bpe_tokenizer(texts, vocab_size):
  """A byte-level BPE tokenizer trained on `texts` (handles any unicode), with Gemma's special-token ids
  (<pad> 0, <eos> 1, <bos> 2) and a BOS prepended, as a transformers fast tokenizer."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                              pad_token="<pad>")
