"""Sana 1.5 1.6B: the 1.6B shape with RMSNorm on q and k across heads. Trained at 1024 px."""
from configs import common


def get_config(arg=""):
  return common.sana_config("1600m", arg, qk_norm=True)
