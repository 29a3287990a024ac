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
