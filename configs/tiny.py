"""A CPU-sized Sana run on synthetic latents: the whole training code path in seconds per step.

  python train.py --config configs/tiny.py --workdir /tmp/tiny
  python train.py --config configs/tiny.py --workdir /tmp/tiny --config.total_steps=50 --config.mesh.fsdp=2
"""
import ml_collections as mlc

from configs import common


def get_config(arg=""):
  arg = common.parse_arg(arg, steps=20)
  c = mlc.ConfigDict()
  c.model = common.shrink_for_runlocal(common.sana_transformer("600m", 512))
  c.model.in_channels = c.model.out_channels = 4
  c.model.sample_size = 8
  c.model.caption_channels = 16
  c.dtype = "float32"
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = {}
  data = dict(source="synthetic", latent_size=8, latent_channels=4, caption_length=8, caption_channels=16,
              num_workers=0)
  common.training(c, batch_size=8, total_steps=arg.steps, lr=1e-3, warmup_steps=2, data=data)
  c.log_every = 1
  c.checkpoint_every = 5
  c.optim.clip_norm = 1.0
  c.eval.every = 10
  return c
