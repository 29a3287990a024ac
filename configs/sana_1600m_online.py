"""Sana 1.6B at 512 or 1024 px from raw images, encoded online, for an 8-GPU host or a 64-chip TPU slice.

  python train.py --config configs/sana_1600m_online.py:res=1024,target=tpu64 --workdir DIR \\
      --config.encoders=/models/Sana_1600M_1024px_diffusers --config.data.source=tfds:my_images
  python -m sana_jax.training.plan --config configs/sana_1600m_online.py:res=1024,target=gpu8 --devices 8 --target h100
See configs/online.py for the arguments and how the batch was planned.
"""
from configs import online


def get_config(arg=""):
  return online.online_config("1600m", arg)
