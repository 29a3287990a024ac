"""Sana 0.6B at 512 or 1024 px from raw images, encoded online, for an 8-GPU host or a 64-chip TPU slice.

  python train.py --config configs/sana_600m_online.py:res=512,target=gpu8 --workdir DIR \\
      --config.encoders=/models/Sana_600M_512px_diffusers --config.data.source=folder:/data/images
  python -m sana_jax.training.plan --config configs/sana_600m_online.py:res=1024,target=tpu64 --devices 64 --target v5e
See configs/online.py for the arguments and how the batch was planned.
"""
from configs import online


def get_config(arg=""):
  return online.online_config("600m", arg)
