"""Sana 0.6B (width 1152, 28 layers). Resolutions 512/1024/2048/4096 (2K/4K add sin-cos PE).

  from configs import sana_600m; c = sana_600m.get_config("res=1024")
  Laptop smoke run of the same code path: get_config("res=512,runlocal")
"""
from configs import common


def get_config(arg=""):
  return common.sana_config("600m", arg)
