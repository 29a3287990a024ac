"""Memory plans (sana_jax.training.plan): the parts of the tiny run's plan add up, sharding over fsdp halves the
weights each device holds, a target too small does not fit, train.py's fit check refuses such a step in one line,
the CLI prints a table and JSON and fails in one line, and the shipped online configs are consistent."""
import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import cpu_env

from configs import tiny
from sana_jax import parallel
from sana_jax.errors import SanaError
from sana_jax.training import loop, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_2 = pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices; tests/conftest.py sets XLA_FLAGS")
HELD = ("parameters", "optimizer state", "EMA", "frozen base", "encoders", "batch")


def tiny_plan(**mesh):
  c = tiny.get_config()
  c.mesh.update(mesh)
  return plan.make_plan(c, devices=jax.devices()[:2], target="v5e")


@NEEDS_2
def test_parts_add_up_and_fsdp_halves_the_weights_per_device():
  data = tiny_plan(data=2, fsdp=1)
  parts = data["bytes"]
  assert sum(v for k, v in parts.items() if k != "peak") == parts["peak"]
  held = sum(parts[k] for k in HELD)  # what lives on a device: the step's arguments, here all of them used
  assert abs(held - data["xla_bytes"]["arguments"]) <= 0.01 * held
  assert parts["temporaries"] > 0 and data["fits"] is True and data["per_device"] == 4

  fsdp = tiny_plan(data=1, fsdp=2)
  ratio = fsdp["bytes"]["parameters"] / parts["parameters"]
  assert 0.5 <= ratio < 0.6  # a few small weights (norms, the 16-wide caption input) stay whole
  assert 0.5 <= fsdp["bytes"]["optimizer state"] / parts["optimizer state"] < 0.65
  assert fsdp["bytes"]["batch"] == parts["batch"]  # 4 rows per device either way


@NEEDS_2
def test_online_plan_counts_the_encoders():
  c = importlib.import_module("configs.sana_600m_online").get_config("runlocal")
  c.mesh.update(data=1, fsdp=2)
  p = plan.make_plan(c, devices=jax.devices()[:2], target=1e-6)
  assert p["encoders"] == "config.plan_encoders" and p["pixels"] == [16, 16]
  assert p["bytes"]["encoders"] > 0 and p["fits"] is False
  # jit drops the DC-AE decoder from the step's arguments, but the run holds it: the plan counts it
  assert sum(p["bytes"][k] for k in HELD) > p["xla_bytes"]["arguments"]


@NEEDS_2
def test_fit_check_refuses_a_step_that_cannot_fit_in_one_line():
  c = tiny.get_config()
  steps = plan.StepPlan(c, parallel.make_mesh(data=2, devices=jax.devices()[:2]))
  batch, null_text = steps.inputs(steps.rows)
  need = plan.check_step_fits(steps.trainer, steps.state, batch, null_text, limit=2**40)
  assert 0 < need < 2**30
  with pytest.raises(SanaError, match=r"needs .* GiB per device but a device allows") as e:
    plan.check_step_fits(steps.trainer, steps.state, batch, null_text, limit=need - 1)
  assert "\n" not in str(e.value)
  assert plan.check_step_fits(steps.trainer, steps.state, batch, null_text) is None  # CPU: skipped


def test_train_runs_the_fit_check_before_its_first_step(tmp_path, monkeypatch):
  c = tiny.get_config()
  c.eval.every = 0
  monkeypatch.setattr(plan, "device_memory_stats", lambda device=None: {"bytes_limit": 1024, "bytes_in_use": 0})
  with pytest.raises(SanaError, match="the train step needs"):
    loop.train(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints" / "1")  # refused before the first step


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "sana_jax.training.plan", *args], cwd=ROOT, capture_output=True,
                        text=True, env=cpu_env(1))


def test_cli_table_and_json_and_a_target_too_small():
  out = run_cli("--config", "configs/tiny.py", "--devices", "2", "--config.mesh.fsdp=2", "--target", "0.0001")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert result["devices"] == 2 and result["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert result["fits"] is False and any(line.endswith("DOES NOT FIT") for line in lines)
  assert any(line.startswith("  parameters") for line in lines)


@pytest.mark.parametrize("args", [
    ["--config", "configs/tiny.py", "--target", "h1000"],
    ["--config", "configs/tiny.py", "--devices", "0"],
    ["--config", "configs/tiny.py", "--headroom", "1.5"],
    ["--config", "configs/tiny.py", "--bogus"],
    ["--config", "configs/tiny.py", "--config.no_such_key=1"],
    ["--config", "configs/missing.py"],
    ["--devices", "2"],
    ["--config", "configs/sana_600m_online.py:target=gpu4"],
    ["--config", "configs/tiny.py", "--devices", "2", "--max-batch"],
])
def test_cli_bad_input_is_one_line_exit_2(args):
  out = run_cli(*args)
  assert out.returncode == 2, (out.stdout, out.stderr)
  assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("name", ["sana_600m_online", "sana_1600m_online"])
def test_online_configs_split_their_batch_over_the_target(name):
  from configs import online
  module = importlib.import_module(f"configs.{name}")
  for res in (512, 1024):
    for target, (_, devices) in online.TARGETS.items():
      c = module.get_config(f"res={res},target={target}")
      assert c.mesh.to_dict() == {"data": 1, "fsdp": -1, "tensor": 1} and c.data.source.startswith("folder:")
      assert c.batch_size == online.PLANNED[name.split("_")[1], res, target][0] * devices
      assert c.model.sample_size == res // 32
      assert c.plan_encoders.text_encoder.hidden_size == c.model.caption_channels == 2304


@pytest.mark.slow
def test_abstract_encoders_match_the_loaded_ones(tmp_path):
  """From a pipeline directory the plan reads configs and tokenizer only: its encoders have the loaded ones'
  shapes, dtypes and shardings, and tokenize to the same length."""
  from reference import save_tiny_sana_pipeline
  from test_pipeline import tiny_tokenizer

  from sana_jax.training.encoders import OnlineEncoders
  save_tiny_sana_pipeline(tmp_path, tiny_tokenizer(), downsample_block_type="conv", upsample_block_type="interpolate")
  mesh = parallel.make_mesh(data=1, fsdp=2, devices=jax.devices()[:2])
  c = tiny.get_config()
  c.encoders = str(tmp_path)
  abstract = plan.abstract_encoders(c, mesh, None, np.float32)
  loaded = OnlineEncoders(str(tmp_path), mesh, None, dtype=np.float32)
  describe = lambda tree: {jax.tree_util.keystr(path): (a.shape, a.dtype, a.sharding)
                           for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert describe(abstract.params) == describe(loaded.params)
  ids, _, keep = loaded.prompts.positive_tokens(["a red fox"])
  assert abstract.token_length == ids.shape[1] and np.array_equal(abstract._keep, keep)
  assert abstract.scaling_factor == loaded.scaling_factor
