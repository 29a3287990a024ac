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


def save_tiny_sana_pipeline(root, tokenizer, *, sprint=False, dit_options=None, **vae_options):
  """A tiny random diffusers SanaPipeline (Gemma-2, DiT and 4x DC-AE shifted off init; 8-channel latents,
  text width 32), saved to `root` in the official format. Returns the diffusers pipeline. sprint: a
  SanaSprintPipeline instead (SCMScheduler; a transformer with a guidance embedding and q/k norms, as
  Sana-Sprint's); dit_options: transformer settings over these."""
  import diffusers
  import torch
  import transformers
  torch.manual_seed(0)
  gemma = transformers.Gemma2Model(transformers.Gemma2Config(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=1024,
      pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager")).eval()
  dit = diffusers.SanaTransformer2DModel(**{
      **dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, num_layers=2,
             num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=64, caption_channels=32,
             sample_size=8), **(dict(guidance_embeds=True, qk_norm="rms_norm_across_heads") if sprint else {}),
      **(dit_options or {})}).eval()
  vae = diffusers.AutoencoderDC(
      in_channels=3, latent_channels=8, attention_head_dim=8, encoder_block_types="ResBlock",
      decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16, 16),
      decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
      encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), (5,)), scaling_factor=0.6,
      **vae_options).eval()
  for i, m in enumerate((gemma, dit, vae)):
    shift_off_init(m, seed=i, scale=0.05)
  if sprint:
    scheduler, cls = diffusers.SCMScheduler(sigma_data=0.5), diffusers.SanaSprintPipeline
  else:
    scheduler = diffusers.DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                      prediction_type="flow_prediction")
    cls = diffusers.SanaPipeline
  ref = cls(tokenizer=tokenizer, text_encoder=gemma, transformer=dit, vae=vae, scheduler=scheduler)
  ref.save_pretrained(root)
  return ref
