"""Sana-Sprint 1.6B: qk-norm and a guidance embedding (few-step distilled), 1024 px."""
from configs import common


def get_config(arg=""):
  return common.sana_config("1600m", arg, qk_norm=True, guidance_embeds=True)
