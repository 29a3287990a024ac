"""An original NVlabs/Sana checkpoint (.pth, or an original-layout .safetensors) as a diffusers directory.

  python -m sana_jax.convert Sana_1600M_4Kpx_BF16.pth --out sana-4k/transformer --resolution 4096
  python -m sana_jax.convert Sana_1600M_4Kpx_BF16.pth --out sana-4k --pipeline Sana_1600M_1024px_diffusers

The .pth is read without unpickling code (anything but tensors and containers is refused). The config is
inferred for the released sizes (0.6B, 1.6B, 4.8B; Sana 1.0 / 1.5 / Sprint / ControlNet from the keys),
the resolution from --resolution or the checkpoint's pos_embed; --config FILE.json (a diffusers
transformer config) overrides any of it, for other sizes. --out is a transformer directory (the
ControlNet's, for a ControlNet checkpoint), or with --pipeline BASE_DIR a whole pipeline directory taking
BASE_DIR's text encoder, tokenizer and VAE. Weights keep their stored dtype unless --dtype is given, and
are written one tensor at a time. --out appears whole or not at all.
"""
import sys

from sana_jax import dtypes, errors, files


def parse_args(argv):
  parser = errors.ArgumentParser(prog="python -m sana_jax.convert", description=__doc__.split("\n")[0])
  parser.add_argument("src", help="the original checkpoint (.pth or .safetensors)")
  parser.add_argument("--out", required=True, help="the diffusers directory to write")
  parser.add_argument("--resolution", type=int, help="512, 1024, 2048 or 4096 (default: from pos_embed)")
  parser.add_argument("--config", help="a diffusers transformer config.json whose fields override the inferred ones")
  parser.add_argument("--dtype", choices=sorted(dtypes.DTYPES), help="weights' dtype (default: as stored)")
  parser.add_argument("--pipeline", help="a diffusers Sana pipeline directory (or hub id) to take the text "
                                         "encoder, tokenizer and VAE from")
  return parser.parse_args(argv)


@errors.cli_main
def main(argv=None):
  args = parse_args(argv)
  files.regular_file(args.src, "checkpoint")
  files.output_directory(args.out, "--out", create=False)
  from sana_jax.convert import nvlabs
  print(nvlabs.convert(args.src, args.out, resolution=args.resolution, config=args.config, dtype=args.dtype,
                       pipeline=args.pipeline))
  return 0


if __name__ == "__main__":
  sys.exit(main())
