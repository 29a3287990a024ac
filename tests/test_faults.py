"""Fault injection at every boundary where users' files and values come in: damaged weights, configs,
model_index.json, paths, output directories and command-line values. Each must end as one line
`error: ...` with exit status 2: no traceback, no stray file, nothing outside the output directory
touched. (Damaged training workdirs: test_faults_training.py.)

Most cases call the CLIs' main(argv) in this process (an unexpected exception fails the test with its
traceback), on a copy of the shipped demo model: a real pipeline small enough to copy per case.
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import sample
from sana_jax.convert import safetensors_io
from sana_jax.errors import SanaError

DEMO = os.path.join(os.path.dirname(sample.files.__file__), "assets", "sana-shapes")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(tmp_path):
  return shutil.copytree(DEMO, tmp_path / "model")


def run_sample(capsys, *args):
  """(exit status, stderr) of sample.py's main in this process."""
  status = sample.main([str(a) for a in args])
  return status, capsys.readouterr().err


def assert_one_line_error(status, err, match):
  lines = [line for line in err.splitlines() if line.strip()]
  assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
  assert match in lines[0] and len(lines[0]) < 400, lines[0]


def expect_error(capsys, tmp_path, match, *args):
  """sample.py with `args` fails in one line and writes nothing."""
  status, err = run_sample(capsys, "a red circle", "--steps", 1, "--output-dir", tmp_path / "out", *args)
  assert_one_line_error(status, err, match)
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# damaged weights: the header is validated whole before any data is touched


def write_raw(path, header, data=b""):
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def tensor(dtype="F32", shape=(2,), offsets=(0, 8)):
  return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HEADERS = {
    "overlapping offsets": ({"a": tensor(), "b": tensor(offsets=(4, 12))}, 16, "overlaps"),
    "past the end": ({"a": tensor(offsets=(0, 8)), "b": tensor(offsets=(8, 64))}, 16, "past the end"),
    "gap": ({"a": tensor(), "b": tensor(offsets=(12, 20))}, 20, "gap"),
    "bytes vs shape": ({"a": tensor(shape=(3,))}, 8, "needs 12"),
    "unknown dtype": ({"a": tensor(dtype="F8_E5M2")}, 8, "unsupported dtype"),
    "negative shape": ({"a": tensor(shape=(-2,))}, 8, "non-negative"),
    "float offsets": ({"a": tensor(offsets=(0.0, 8.0))}, 8, "data_offsets"),
    "begin after end": ({"a": tensor(offsets=(8, 0))}, 8, "begin <= end"),
    "data not covered": ({"a": tensor()}, 16, "cover 8 of"),
    "header a list": ([1, 2], 0, "JSON list"),
    "bad metadata": ({"__metadata__": {"format": 1}, "a": tensor()}, 8, "__metadata__"),
    "entry not an object": ({"a": 5}, 0, "exactly dtype, shape and data_offsets"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_safetensors_header_lies_are_errors(tmp_path, case):
  header, data_bytes, match = HEADERS[case]
  write_raw(tmp_path / "w.safetensors", header, bytes(data_bytes))
  with pytest.raises(SanaError, match=match) as e:
    safetensors_io.read_file(tmp_path / "w.safetensors")
  assert str(tmp_path / "w.safetensors") in str(e.value)


def test_safetensors_truncated_or_not_safetensors(tmp_path):
  path = tmp_path / "w.safetensors"
  for raw, match in [(b"", "no header"), (struct.pack("<Q", 2**62) + b"{}", "exceeds the file"),
                     (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
                     (struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON")]:
    path.write_bytes(raw)
    with pytest.raises(SanaError, match=match):
      safetensors_io.read_file(path)


def test_valid_file_reads_as_written(tmp_path):
  from safetensors.numpy import save_file
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((0, 4), np.int64), "c": np.ones(1, bool)}
  save_file(arrays, tmp_path / "w.safetensors")
  back = safetensors_io.read_file(tmp_path / "w.safetensors")
  assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in arrays.items())


@pytest.mark.parametrize("damage,match", [
    ("truncate", "truncated"), ("overlap", "overlaps"), ("huge header", "exceeds the file")])
def test_damaged_weights_through_the_cli(capsys, tmp_path, model, damage, match):
  path = model / WEIGHTS
  raw = path.read_bytes()
  if damage == "truncate":
    path.write_bytes(raw[:len(raw) // 2])
  elif damage == "huge header":
    path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
  else:  # the second tensor claims the first one's bytes: once a silently different image
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    size = lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
    assert size(first) == size(second)  # the demo's first two tensors are the same size
    header[second]["data_offsets"] = header[first]["data_offsets"]
    write_raw(path, header, raw[8 + n:])
  expect_error(capsys, tmp_path, match, "--model", model)


def test_damaged_vae_in_precompute(capsys, tmp_path, model):
  from sana_jax.data import precompute
  path = model / "vae" / "diffusion_pytorch_model.safetensors"
  path.write_bytes(path.read_bytes()[:1000])
  images = tmp_path / "images"
  images.mkdir()
  status = precompute.main(["--images", str(images), "--model", str(model), "--out", str(tmp_path / "pre")])
  assert_one_line_error(status, capsys.readouterr().err, "vae")
  assert not (tmp_path / "pre").exists()


# ---------------------------------------------------------------------------------------------
# configs and model_index.json: types and ranges, short messages


def setting(key, value):
  """A change to a config dict: one field set (None: removed)."""
  return lambda c: {k: v for k, v in {**c, key: value}.items() if v is not None}


def ours(key, value):
  """A change to model_index.json's "sana_jax" settings."""
  return lambda c: {**c, "sana_jax": {**c.get("sana_jax", {}), key: value}}


CONFIG_CASES = {  # file, raw text or a change to its JSON, what the error names
    "config not JSON": ("transformer/config.json", "{oops", "not valid JSON"),
    "config a list": ("transformer/config.json", "[1]", "JSON list"),
    "wrong type": ("transformer/config.json", setting("num_layers", "abc"), "num_layers"),
    "zero size": ("transformer/config.json", setting("num_attention_heads", 0), "num_attention_heads"),
    "NaN": ("transformer/config.json", setting("norm_eps", float("nan")), "norm_eps"),
    "huge depth": ("transformer/config.json", setting("num_layers", 1000000), "num_layers"),
    "bool for int": ("transformer/config.json", setting("sample_size", True), "sample_size"),
    "unknown key": ("transformer/config.json", setting("frobnicate", 1), "unknown transformer config key"),
    "missing key": ("transformer/config.json", setting("num_layers", None), "missing for layer(s) [8, 9"),
    "vae stages": ("vae/config.json", setting("decoder_layers_per_block", [1]), "decoder_layers_per_block"),
    "vae width": ("vae/config.json", setting("latent_channels", -4), "latent_channels"),
    "gemma heads": ("text_encoder/config.json", setting("num_key_value_heads", 3), "num_key_value_heads"),
    "scheduler not JSON": ("scheduler/scheduler_config.json", "", "not valid JSON"),
    "scheduler class": ("scheduler/scheduler_config.json", setting("_class_name", "DDIMScheduler"), "DDIMScheduler"),
    "scheduler shift": ("scheduler/scheduler_config.json", setting("flow_shift", -1), "flow_shift"),
    "scheduler unsupported": ("scheduler/scheduler_config.json", setting("solver_order", 3), "solver_order"),
    "scheduler of Sprint": ("scheduler/scheduler_config.json", lambda c: {"_class_name": "SCMScheduler"},
                            "a SanaPipeline samples with DPMSolverMultistepScheduler or FlowMatch"),
    "sigma_data": ("scheduler/scheduler_config.json", lambda c: {"_class_name": "SCMScheduler", "sigma_data": 0},
                   "sigma_data"),
    "index not JSON": ("model_index.json", "\x00\x01", "not valid JSON"),
    "index class": ("model_index.json", setting("_class_name", "StableDiffusionPipeline"), "StableDiffusionPipeline"),
    "index class a list": ("model_index.json", setting("_class_name", ["SanaPipeline"]), "pipeline class"),
    "scheduler class a list": ("scheduler/scheduler_config.json", setting("_class_name", [1]), "scheduler [1]"),
    "index component": ("model_index.json", setting("vae", "AutoencoderDC"), "vae must be a [library, class] pair"),
    "sequence length": ("model_index.json", ours("max_sequence_length", 10**9), "max_sequence_length"),
    "guidance": ("model_index.json", ours("guidance_scale", "high"), "guidance_scale"),
    "setting": ("model_index.json", ours("steps", 4), "unknown sana_jax setting"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_files(capsys, tmp_path, model, case):
  name, change, match = CONFIG_CASES[case]
  path = model / name
  path.write_text(change if isinstance(change, str) else json.dumps(change(json.loads(path.read_text()))))
  expect_error(capsys, tmp_path, match, "--model", model)


def test_huge_config_file_is_refused(capsys, tmp_path, model):
  with open(model / "transformer" / "config.json", "w") as f:
    f.write('{"pad": "' + "x" * (17 << 20) + '"}')
  expect_error(capsys, tmp_path, "larger than", "--model", model)


# ---------------------------------------------------------------------------------------------
# paths stay inside the model directory


def shard(model, weight_map):
  """Replaces the transformer's single file by an index naming `weight_map`'s files."""
  os.remove(model / WEIGHTS)
  (model / (WEIGHTS + ".index.json")).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("name,match", [
    ("../../secret.safetensors", "points outside"), ("/etc/passwd", "points outside"),
    ("link.safetensors", "leads outside"), ("fifo.safetensors", "not a regular file"), ("sub", "is a directory")])
def test_shard_paths_stay_inside(capsys, tmp_path, model, name, match):
  outside = tmp_path / "secret.safetensors"
  outside.write_bytes(b"never read")
  os.symlink(outside, model / "transformer" / "link.safetensors")
  os.mkfifo(model / "transformer" / "fifo.safetensors")  # opening it would hang the load
  (model / "transformer" / "sub").mkdir()
  shard(model, {"scale_shift_table": name})
  expect_error(capsys, tmp_path, match, "--model", model)


def test_component_symlinked_out_of_the_model_is_refused(capsys, tmp_path, model):
  shutil.move(model / "vae", tmp_path / "elsewhere")
  os.symlink(tmp_path / "elsewhere", model / "vae")
  expect_error(capsys, tmp_path, "leads outside", "--model", model)


def test_local_looking_paths_never_go_to_the_hub(capsys, tmp_path, monkeypatch):
  loop = tmp_path / "org" / "loop"
  loop.parent.mkdir()
  os.symlink(loop, loop)  # a symlink loop: not a directory, and not a hub id either
  monkeypatch.chdir(tmp_path)
  for model, match in [("org/loop", "is not a directory"), ("./org/name", "does not exist"),
                       ("a/b/c", "does not exist"), (str(tmp_path / "missing"), "does not exist")]:
    expect_error(capsys, tmp_path, match, "--model", model)


def test_hub_snapshot_links_into_blobs_are_fine(tmp_path):
  from sana_jax import files
  repo = tmp_path / "hub" / "models--org--name"
  (repo / "blobs").mkdir(parents=True)
  (repo / "blobs" / "abc").write_text("{}")
  snap = repo / "snapshots" / "rev" / "transformer"
  snap.mkdir(parents=True)
  os.symlink(repo / "blobs" / "abc", snap / "config.json")
  assert files.read_json(files.inside(snap, "config.json")) == {}


# ---------------------------------------------------------------------------------------------
# outputs: found bad before any model loads, written whole, never through a link


def test_output_dir_that_is_a_file(capsys, tmp_path):
  (tmp_path / "out").write_text("mine")
  status, err = run_sample(capsys, "a red circle", "--output-dir", tmp_path / "out")
  assert_one_line_error(status, err, "not a directory")
  assert (tmp_path / "out").read_text() == "mine"
  status, err = run_sample(capsys, "a red circle", "--output-dir", tmp_path / "out" / "sub")
  assert_one_line_error(status, err, "--output-dir")


@pytest.mark.slow
def test_existing_images_kept_links_replaced_not_followed(capsys, tmp_path, monkeypatch):
  import io

  from PIL import Image
  out, victim = tmp_path / "out", tmp_path / "victim.txt"
  out.mkdir()
  victim.write_text("not yours")
  (out / "0003.png").write_bytes(b"an earlier run")
  os.symlink(victim, out / "0000.png")
  # prompts from standard input, one with a NUL and a newline-free control character; the top seeds
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a red circle\x00\x07\n\ntwo blue squares\n")))
  status, err = run_sample(capsys, "--prompt-file", "-", "--steps", 1, "--seed", 2**64 - 2, "--output-dir", out)
  assert status == 0, err
  assert sorted(os.listdir(out)) == ["0000.png", "0003.png", "0004.png", "0005.png"]  # numbering continues
  assert (out / "0003.png").read_bytes() == b"an earlier run" and victim.read_text() == "not yours"
  text = Image.open(out / "0004.png").text
  assert text["prompt"] == "a red circle  " and text["seed"] == str(2**64 - 2)
  assert Image.open(out / "0005.png").text["seed"] == str(2**64 - 1)

  status, err = run_sample(capsys, "a red circle", "--steps", 1, "--overwrite", "--output-dir", out)
  assert status == 0, err
  assert not os.path.islink(out / "0000.png") and victim.read_text() == "not yours"  # the link replaced
  assert Image.open(out / "0000.png").text["prompt"] == "a red circle"
  assert sorted(os.listdir(tmp_path)) == ["out", "victim.txt"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_write_leaves_no_temporary_file(tmp_path, signum):
  """A signal while an output is half-written: the CLI wrapper unwinds, the temporary file goes."""
  script = textwrap.dedent(f"""
      import os, signal, sys
      from sana_jax import files
      from sana_jax.errors import cli_main

      # a test runner started in the background inherits SIGINT ignored: take Python's default back
      signal.signal(signal.SIGINT, signal.default_int_handler)

      @cli_main
      def main():
        with files.atomic_write({str(tmp_path / 'out.png')!r}) as f:
          f.write(b"half an image")
          os.kill(os.getpid(), {int(signum)})
          f.write(b"never")

      sys.exit(main())
  """)
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert r.returncode == 128 + signum and "Traceback" not in r.stderr, r.stderr
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# command-line values


@pytest.mark.parametrize("args,match", [
    (["--seed", 2**70], "[0, 2^64)"), (["--seed", -1], "[0, 2^64)"), (["--seed", 2**64 - 1, "--prompt", "b"], "2^64"),
    (["--aspect=-1:1"], "positive"), (["--aspect", "1:0"], "W:H"), (["--aspect", "inf:1"], "positive"),
    (["--steps", 10**9], "steps"), (["--width", 0], "--width 0"), (["--height", -32], "--height -32"),
    (["--num-images-per-prompt", 10**9], "--num-images-per-prompt"), (["--batch-size", 0], "--batch-size"),
    (["--steps", "x"], "invalid int value"), (["--dtype", "int8"], "invalid choice"), (["--bogus"], "unrecognized"),
    (["--pag-layers", "a,b"], "--pag-layers")])
def test_bad_values(capsys, tmp_path, args, match):
  expect_error(capsys, tmp_path, match, *args)


@pytest.mark.parametrize("raw", [b"caf\xe9 au lait\n", b"\x89PNG\r\n\x1a\n\x00\xff"])  # latin-1, binary
def test_undecodable_prompt_file(capsys, tmp_path, raw):
  (tmp_path / "prompts.txt").write_bytes(raw)
  expect_error(capsys, tmp_path, "not UTF-8", "--prompt-file", tmp_path / "prompts.txt")


def test_prompt_file_from_a_pipe_and_process_substitution(tmp_path):
  """`--prompt-file -` and `--prompt-file <(...)` (a /dev/fd path) are read, not refused."""
  from sana_jax import files
  read, write = os.pipe()
  os.write(write, b"a red circle\n")
  os.close(write)
  try:
    assert files.read_text(f"/dev/fd/{read}") == "a red circle\n"
  finally:
    os.close(read)
  r = subprocess.run([sys.executable, "-c", "from sana_jax import files; print(files.read_text('-'), end='')"],
                     input=b"two blue squares\n", cwd=ROOT, capture_output=True, timeout=60)
  assert r.stdout == b"two blue squares\n", r.stderr
  with pytest.raises(SanaError, match="does not exist"):
    files.read_text(str(tmp_path / "nope.txt"))


def cli_modules():
  """Every `python -m sana_jax...` command line: the modules with a __main__ block."""
  package = os.path.join(ROOT, "sana_jax")
  for folder, _, names in os.walk(package):
    for name in sorted(names):
      path = os.path.join(folder, name)
      if name.endswith(".py") and 'if __name__ == "__main__":' in open(path, encoding="utf-8").read():
        yield os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")


@pytest.mark.parametrize("module", sorted(cli_modules()))
def test_every_cli_fails_in_one_line(capsys, module):
  """The same error path everywhere: an unknown flag is one line and status 2 (argparse's usage dump
  included in none of them)."""
  import importlib
  status = importlib.import_module(module).main(["--no-such-flag"])
  assert_one_line_error(status, capsys.readouterr().err, "")  # required arguments are named first
