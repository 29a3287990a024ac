"""Sana 1.5 4.8B (width 2240, 60 layers, RMSNorm on q and k across heads). Trained at 1024 px.

  from configs import sana15_4800m; c = sana15_4800m.get_config("res=1024,remat=full")
"""
from configs import common


def get_config(arg=""):
  return common.sana_config("4800m", arg, qk_norm=True)
