"""Re-encode the captions of a precomputed dataset with another text encoder, keeping its latents.

  python -m sana_jax.data.reencode --data DIR --model DIFFUSERS_DIR --out DIR [--batch-size 256]

For a changed text encoder (or prompt settings) over images already encoded: the DC-AE latents (and
control latents) are copied as stored, every caption of every record is encoded again as `precompute`
encodes it (the model directory's text_encoder/, tokenizer/ and model_index.json prompt settings), and
so is the null caption. Like precompute, the output appears only when complete (OUT.partial, then renamed).
"""
import json
import os
import sys

import numpy as np

from sana_jax import files
from sana_jax.data import records
from sana_jax.errors import ArgumentParser, SanaError, cli_main


def reencode(data, out, encode_captions, null_text=None, *, batch_size=256, extra_metadata=None):
  """Writes `data`'s records with new text embeddings to `out`; returns the new metadata.
  encode_captions(list of str) -> (y [N, L, Dy], mask [N, L]), as for `precompute.precompute`."""
  from array_record.python.array_record_module import ArrayRecordReader
  meta = records.read_metadata(data)
  if meta is None:
    raise SanaError(f"--data {data}: no {records.METADATA}; not a precompute output")
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.abspath(data) == out:
    raise SanaError("--out must differ from --data")
  if os.path.exists(out):
    raise SanaError(f"--out {out} exists; choose a new directory")
  with files.atomic_directory(out) as tmp:  # --out appears whole or not at all
    writer, shape = records.ShardWriter(tmp), None
    for bucket in meta["buckets"]:
      for entry in bucket["files"]:
        reader = ArrayRecordReader(os.path.join(data, entry["path"]))
        n = reader.num_records()
        for start in range(0, n, batch_size):
          examples = [records.unpack(r) for r in reader.read(list(range(start, min(start + batch_size, n))))]
          y, mask = encode_captions([c for e in examples for c in e["captions"]])
          y, mask, at = np.asarray(y, np.float32), np.asarray(mask), 0
          shape = dict(caption_length=y.shape[1], caption_channels=y.shape[2])
          for e in examples:
            k = len(e["captions"])
            writer.write(e["size"], e["latents"].shape, records.make_record(
                e["latents"], y[at:at + k], mask[at:at + k], captions=e["captions"], scores=e["scores"],
                key=e["key"], size=e["size"], latent_dtype=e["latents"].dtype, control=e.get("control")))
            at += k
        reader.close()
    meta.update(buckets=writer.close(), **(shape or {}), **(extra_metadata or {}))
    if null_text is not None:
      records.write_null_text(tmp, *null_text)
    files.write_json(os.path.join(tmp, records.METADATA), meta, indent=1)
  return meta


def parse_args(argv):
  p = ArgumentParser(prog="python -m sana_jax.data.reencode", description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="a precompute output (one split)")
  p.add_argument("--model", required=True, help="diffusers-format Sana directory (text_encoder/, tokenizer/, vae/)")
  p.add_argument("--out", required=True, help="a new output directory")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--max-sequence-length", type=int, default=300)
  return p.parse_args(argv)


@cli_main
def main(argv=None):
  from sana_jax.data.precompute import load_encoders
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if records.read_metadata(args.data) is None:  # before loading any model
    raise SanaError(f"--data {args.data}: no {records.METADATA}; not a precompute output")
  _, encode_captions, null_text, _, _ = load_encoders(args.model, batch_size=args.batch_size,
                                                      max_sequence_length=args.max_sequence_length)
  meta = reencode(args.data, args.out, encode_captions, null_text, batch_size=args.batch_size,
                  extra_metadata={"model": args.model})
  print(json.dumps({k: meta[k] for k in ("count", "caption_length", "caption_channels")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
