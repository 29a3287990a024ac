"""Prompt encoding: sana-jax PromptEncoder (jit, cached CHI prefix) vs diffusers' encode_prompt
(transformers Gemma2Model, eager) on the same random weights and tokenizer.

  python bench/text_encoder.py                  # CPU: medium Gemma-2 (width 512, 4 layers), batch 1 and 4
  python bench/text_encoder.py --preset gpu     # GPU: Gemma-2-2B-sized random weights, batch 1 and 16, bf16

The tokenizer is a byte-level BPE trained here on the CHI text (no Gemma tokenizer is available
offline); it cuts the CHI into 205 tokens, printed as chi_tokens.
"""
import argparse
import os
import sys
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sana_jax  # noqa: E402
from bench.common import commit, emit, time_alternating  # noqa: E402
from sana_jax.text import COMPLEX_HUMAN_INSTRUCTION, PromptEncoder  # noqa: E402

MEDIUM = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64)
GEMMA_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256)
PROMPTS = ["a small red fox jumping over a lazy dog in the snow", "a bowl of ramen on a wooden table, studio light",
           "an astronaut riding a horse on the moon", "a watercolor painting of a lighthouse at dusk"]


def tokenizer():
  """A byte-level BPE tokenizer trained on the CHI and the prompts, with Gemma's special-token ids."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<eos>", "<bos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(COMPLEX_HUMAN_INSTRUCTION) + PROMPTS, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                              pad_token="<pad>")


def build(tmp, size, device, dtype_name):
  import diffusers
  import torch
  import transformers
  fast = tokenizer()
  torch.manual_seed(0)
  config = transformers.Gemma2Config(vocab_size=len(fast), max_position_embeddings=2048, pad_token_id=0,
                                     eos_token_id=1, bos_token_id=2, attn_implementation="eager", **size)
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  with torch.device(device):
    model = transformers.Gemma2Model(config).to(tdtype).eval()
  model.save_pretrained(tmp)
  pipe = diffusers.SanaPipeline(tokenizer=fast, text_encoder=model, vae=None, transformer=None, scheduler=None)
  ours = sana_jax.GemmaTextEncoder.from_pretrained(tmp, dtype=dtype_name)
  return fast, pipe, ours


def run(size_name, size, device, dtype_name, batches, repeats):
  import torch
  with tempfile.TemporaryDirectory() as tmp:
    fast, pipe, ours = build(tmp, size, device, dtype_name)
  encoder = PromptEncoder(fast, ours)
  chi_tokens = len(encoder.chi_ids)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  for batch in batches:
    prompts = (PROMPTS * batch)[:batch]

    def theirs():
      with torch.no_grad():
        pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="", device=device,
                           complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION))
      sync()

    def mine():
      jax.block_until_ready(encoder.encode(prompts, negative_prompt=""))

    times = time_alternating({"ours": mine, "transformers": theirs}, repeats)
    emit(dict(bench="text_encoder", model=size_name, batch=batch, dtype=dtype_name, chi_tokens=chi_tokens,
              max_sequence_length=300, device=jax.devices()[0].device_kind, commit=commit(),
              ours_ms=round(times["ours"] * 1e3, 2), transformers_ms=round(times["transformers"] * 1e3, 2),
              ratio=round(times["ours"] / times["transformers"], 3)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
  p.add_argument("--repeats", type=int, default=None)
  args = p.parse_args()
  if args.preset == "cpu":
    run("medium", MEDIUM, "cpu", "float32", [1, 4], args.repeats or 5)
  else:
    run("gemma2_2b_random", GEMMA_2B, "cuda", "bfloat16", [1, 16], args.repeats or 5)


if __name__ == "__main__":
  main()
