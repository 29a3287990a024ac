"""Sana 1.6B (width 2240, 20 layers). Resolutions 512/1024/2048/4096 (2K/4K add sin-cos PE).

  from configs import sana_1600m; c = sana_1600m.get_config("res=4096")
  Laptop smoke run of the same code path: get_config("res=1024,runlocal")
"""
from configs import common


def get_config(arg=""):
  return common.sana_config("1600m", arg)
