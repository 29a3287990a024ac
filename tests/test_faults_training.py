"""What a user meets when training goes wrong, through the real command lines: a damaged or foreign
checkpoint step is moved aside and the run resumes from the newest step that restores; a torn
metrics line is repaired; a bad config value, flag or workdir is one line `error: ...` and exit
status 2 before any work. One short run (steps 2, 4, 6 checkpointed) is trained once and copied."""
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import cpu_env
from test_train import ROOT, metrics, train_cmd, train_losses

from configs import tiny
from sana_jax.errors import SanaError
from sana_jax.training import config_checks, runlog

# one device: the fault paths do not depend on the mesh, and 8 simulated devices compile far slower
ENV = cpu_env(1)
STEPS = ["--config.checkpoint_every=2", "--config.eval.every=0", "--config.log_every=1"]


def run(args, timeout=900):
  return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def train(workdir, total_steps, *overrides):
  return run(train_cmd(workdir, f"--config.total_steps={total_steps}", *STEPS, *overrides))


def assert_user_error(out, match=None):
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines and lines[-1].startswith("error: "), out.stderr[-3000:]
  assert len(lines[-1]) < 320
  if match:
    assert match in lines[-1], lines[-1]


def assert_clean_run(out):
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr[-3000:]


def warnings(out):
  return [line for line in out.stderr.splitlines() if line.startswith("warning: ")]


def steps_on_disk(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def truncate_largest_file(step_dir):
  """Cuts the largest file of a checkpoint step's train state in half: it holds array data, so the
  step can no longer restore."""
  paths = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state")) for n in names]
  path = max(paths, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained for 6 steps, checkpoints at 2, 4 and 6, every step logged."""
  workdir = tmp_path_factory.mktemp("faults") / "base"
  assert_clean_run(train(workdir, 6))
  assert steps_on_disk(workdir) == ["2", "4", "6"]
  return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


# ---- resume past damage ---------------------------------------------------------------------------

def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes(trained, run_copy):
  truncate_largest_file(run_copy / "checkpoints" / "6")
  out = train(run_copy, 8)
  assert_clean_run(out)
  assert steps_on_disk(run_copy) == ["4", "6", "6.corrupt-1", "8"]
  [warning] = warnings(out)
  assert "checkpoint step 6" in warning and "6.corrupt-1" in warning
  losses, before = train_losses(run_copy), train_losses(trained)
  assert sorted(losses) == list(range(1, 9))  # steps 5 and 6 logged again, from step 4
  assert all(losses[s] == before[s] for s in range(1, 7))  # bit-exact: the resume from 4 is exact


def test_empty_step_directory_and_torn_metrics_line_do_not_block_resume(run_copy):
  os.mkdir(run_copy / "checkpoints" / "99")  # orbax lists any directory named by an integer
  with open(run_copy / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss": 0.5, "grad_')  # a run killed in the middle of a write
  out = train(run_copy, 8)
  assert_clean_run(out)
  assert "99.corrupt-1" in steps_on_disk(run_copy) and "99" not in steps_on_disk(run_copy)
  assert len(warnings(out)) == 2, out.stderr
  assert "checkpoint step 99" in warnings(out)[0] and "metrics.jsonl" in warnings(out)[1]
  assert [m["step"] for m in metrics(run_copy)] == list(range(1, 9))  # resumed from 6; every line parses, once


def test_no_step_restores_starts_afresh(run_copy):
  for step in ("2", "4", "6"):
    truncate_largest_file(run_copy / "checkpoints" / step)
  out = train(run_copy, 4)
  assert_clean_run(out)
  assert [w for w in warnings(out) if "does not restore" in w] and "starting the run afresh" in warnings(out)[-1]
  assert steps_on_disk(run_copy) == ["2", "2.corrupt-1", "4", "4.corrupt-1", "6.corrupt-1"]
  assert sorted(train_losses(run_copy)) == [1, 2, 3, 4]


def test_checkpoint_of_another_config_is_an_error_and_nothing_moves(run_copy):
  out = train(run_copy, 8, "--config.ema_decay=0.9")  # the saved state has no EMA
  assert_user_error(out, "different model or optimizer config")
  assert steps_on_disk(run_copy) == ["2", "4", "6"]


def test_failed_restore_is_one_warning_not_a_flood(tmp_path):
  """Orbax closes its event loop when a read fails, with other reads in flight: each then reports
  'Event loop is closed' through sys.unraisablehook. Many large arrays keep reads in flight."""
  script = textwrap.dedent(f"""
      import gc, os, sys
      import jax, jax.numpy as jnp, ml_collections, numpy as np
      from sana_jax.training.checkpoint import Checkpointer
      from sana_jax.training.trainer import TrainState
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      def state(abstract):
        make = ((lambda: jax.ShapeDtypeStruct((256, 1024), jnp.float32, sharding=device)) if abstract
                else (lambda: jnp.asarray(np.random.rand(256, 1024).astype(np.float32))))
        zero = jax.ShapeDtypeStruct((), jnp.int32, sharding=device) if abstract else jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params={{f"a{{i}}": make() for i in range(160)}}, opt_state={{}}, ema=None,
                          nonfinite=zero, skipped=zero)
      workdir = {str(tmp_path)!r}
      ckpt = Checkpointer(workdir)
      for step in (1, 2):
        ckpt.save(step, state(False), {{"position": step}}, ml_collections.ConfigDict(dict(a=1)))
      ckpt.close()
      {textwrap.indent(inspect.getsource(truncate_largest_file), "      ").strip()}
      truncate_largest_file(workdir + "/checkpoints/2")
      print("restoring", file=sys.stderr, flush=True)
      ckpt = Checkpointer(workdir)
      step, _, data = ckpt.restore_latest(state(True))
      ckpt.close()
      gc.collect()
      print("restored", step, data)
      # how many reads are still in flight, and report late, depends on the machine's speed: report
      # one late through each channel as a slow machine would, then one real error that must show
      import asyncio
      loop = asyncio.new_event_loop()
      loop.close()
      try:
        loop.call_soon_threadsafe(print)
      except RuntimeError as error:  # as tensorstore's native callback meets it: no Python caller
        sys.excepthook(type(error), error, error.__traceback__.tb_next)
      import orbax.checkpoint as ocp
      task_error = RuntimeError("Event loop is closed")
      asyncio.log.logger.error("Task exception was never retrieved\\nfuture: <Task coro=<read() defined at %s>>",
                               ocp.__file__, exc_info=(RuntimeError, task_error, None))
      read_error = ValueError('OUT_OF_RANGE: Error reading "params.a1/0.0" in OCDBT database at local file')
      asyncio.log.logger.error("Future exception was never retrieved\\nfuture: <Future finished exception=%r>",
                               read_error, exc_info=(ValueError, read_error, None))
      sys.excepthook(KeyError, KeyError("a real error"), None)
  """)
  out = run([sys.executable, "-c", script])
  assert out.returncode == 0 and "restored 1 {'position': 1}" in out.stdout, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr[-3000:]
  after = out.stderr[out.stderr.index("restoring\n") + len("restoring\n"):]
  assert [line for line in after.splitlines() if line.strip()] == [*warnings(out), "KeyError: 'a real error'"]
  assert len(warnings(out)) == 1


# ---- bad input: one line, exit status 2, nothing done --------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("--config.checkpoint_every=0", "config.checkpoint_every"),
    ("--config.log_every=0", "config.log_every"),
    ("--config.total_steps=-1", "config.total_steps"),
    ("--config.optim.lr=nan", "config.optim.lr"),
    ("--config.total_steps=abc", "total_steps"),  # a wrong type: ml_collections refuses it
])
def test_bad_config_value_exits_2_before_any_work(tmp_path, override, key):
  workdir = tmp_path / "run"
  out = run(train_cmd(workdir, override))
  assert_user_error(out, key)
  assert not os.path.exists(workdir / "checkpoints")


def test_workdir_that_is_a_file_exits_2(tmp_path):
  workdir = tmp_path / "file"
  workdir.write_text("not a directory")
  assert_user_error(run(train_cmd(workdir)), "not a directory")
  assert workdir.read_text() == "not a directory"


@pytest.mark.parametrize("args", [
    ["-m", "sana_jax.training.sweep"],
    ["-m", "sana_jax.training.sweep", "configs/sweeps/tiny_lr.py", "--workdir", "W", "--bogus"],
    ["-m", "sana_jax.training.export_model", "--workdir", "W"],
    ["-m", "sana_jax.training.export_model", "--workdir", "W", "--out", "O", "--dtype", "int8"],
    ["-m", "sana_jax.training.export_model", "--workdir", "/nonexistent/run", "--out", "O"],
])
def test_training_clis_bad_arguments_exit_2(tmp_path, args):
  assert_user_error(run([sys.executable, *args]))


def test_sweep_file_that_raises_exits_2(tmp_path):
  sweep = tmp_path / "sweep.py"
  sweep.write_text("BASE = 'configs/tiny.py'\ndef get_sweep():\n  return 1 / 0\n")
  assert_user_error(run([sys.executable, "-m", "sana_jax.training.sweep", str(sweep), "--workdir", str(tmp_path)]),
                    "ZeroDivisionError")


# ---- the checks themselves (in-process, no device work) ---------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("checkpoint_every", 0), ("log_every", 0), ("total_steps", 0), ("batch_size", 0), ("keep_checkpoints", 0),
    ("max_nonfinite_steps", 0), ("grad_accum", 0), ("grad_accum", 3), ("eval.every", -1), ("sample.every", -1),
    ("sample.every", 5), ("ema_decay", 1.0), ("ema_decay", -0.1), ("ema_decay", math.nan),
    ("objective.weighting", "normal"), ("objective.caption_dropout", 1.5), ("objective.flow_shift", 0.0),
    ("objective.flow_shift", math.inf), ("objective.logit_std", math.nan), ("optim.lr", 0.0), ("optim.lr", math.inf),
    ("optim.lr", math.nan), ("optim.clip_norm", math.nan), ("optim.name", "lamb"), ("dtype", "float64"),
])
def test_check_config_names_the_key(tmp_path, key, value):
  config = tiny.get_config()
  *parents, name = key.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value
  with pytest.raises(SanaError) as e:
    config_checks.check(config, str(tmp_path / "run"))
  assert f"config.{key}" in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300
  assert not os.path.exists(tmp_path / "run")


def test_check_config_accepts_the_shipped_configs(tmp_path):
  from configs import demo_shapes, sana_600m
  for config in (tiny.get_config(), demo_shapes.get_config("latents=/data"), sana_600m.get_config("res=512,runlocal")):
    config_checks.check(config, str(tmp_path / "run"))
  assert os.path.isdir(tmp_path / "run")


def test_drop_lines_after_skips_what_is_not_a_record(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  lines = [b'{"step": 1, "loss": 1.0}', b"", b"[1, 2]", b'{"step": "2"}', b'{"step": true}', b"\xff\xfe",
           b'{"step": 2, "loss": NaN}', b'{"step": 3}', b'{"step": 4, "lo']
  path.write_bytes(b"\n".join(lines))
  runlog._drop_lines_after(str(path), 2)
  assert path.read_bytes() == b'{"step": 1, "loss": 1.0}\n{"step": 2, "loss": NaN}\n'
  assert "dropped 5 line(s)" in capsys.readouterr().err
  runlog._drop_lines_after(str(path), 2)  # a clean file: no warning, unchanged
  assert capsys.readouterr().err == "" and len(json.loads(path.read_text().splitlines()[0])) == 2
