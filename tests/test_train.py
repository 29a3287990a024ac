"""Training: the objective, one step sharded vs on one device, exact resume after SIGKILL, two
processes joined by jax.distributed, restore onto another mesh, non-finite steps, and the CLI."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cpu_env

from configs import tiny
from sana_jax import parallel
from sana_jax.errors import SanaError
from sana_jax.training import objective
from sana_jax.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/tiny.py")
NEEDS_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")


def batch(cfg, seed=0, n=None):
  rng = np.random.default_rng(seed)
  n = n or cfg.batch_size
  d = cfg.data
  mask = np.zeros((n, d.caption_length), np.int32)
  for i in range(n):
    mask[i, : 1 + i % d.caption_length] = 1
  return dict(latents=rng.normal(size=(n, 6, 10, d.latent_channels)).astype(np.float32),
              y=rng.normal(size=(n, d.caption_length, d.caption_channels)).astype(np.float32), mask=mask)


def assert_params_close(a, b):
  """Params of two runs equal within float noise. Left out: the cross-attention key bias, which adds q.b to
  every key's score alike, so the softmax ignores it: its true gradient is zero, and Adam-type steps blow its
  float noise up to +-lr, differently for other roundings or meshes (present when attention_bias is on)."""
  for p in (a, b):
    p["blocks"]["attn2"]["to_k"].pop("bias", None)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5)


def null_text(cfg):
  return (np.zeros((cfg.data.caption_length, cfg.data.caption_channels), np.float32),
          np.eye(1, cfg.data.caption_length, dtype=np.int32)[0])


# ---- the objective ---------------------------------------------------------------------------------

def test_integer_timesteps_follow_the_reference_schedule():
  sigma, t = objective.sample_sigmas(jax.random.key(0), 4096, flow_shift=3.0, integer_timesteps=True)
  sigma, t = np.asarray(sigma), np.asarray(t)
  assert np.array_equal(t, np.floor(t)) and t.min() >= 0 and t.max() < 1000
  base = np.round(sigma / (3 - 2 * sigma) * 1000)  # invert the shift: the base index t/1000
  assert np.allclose(sigma, 3 * (base / 1000) / (1 + 2 * (base / 1000)), atol=1e-6)
  assert np.array_equal(t, np.floor(sigma * 1000))


def test_logit_normal_sigmas_and_shift():
  u = np.asarray(objective.sample_sigmas(jax.random.key(1), 20000, flow_shift=1.0)[0])
  logits = np.log(u / (1 - u))
  assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1) < 0.03
  shifted, t = objective.sample_sigmas(jax.random.key(1), 20000, flow_shift=3.0)
  assert np.allclose(shifted, 3 * u / (1 + 2 * u), atol=1e-6) and np.allclose(t, 1000 * np.asarray(shifted))
  uniform = np.asarray(objective.sample_sigmas(jax.random.key(2), 20000, weighting="uniform")[0])
  assert abs(uniform.mean() - 0.5) < 0.01


def test_flow_loss_target_is_noise_minus_data():
  x0, noise = jnp.ones((2, 2, 2, 1)), jnp.full((2, 2, 2, 1), 3.0)
  sigma = jnp.array([0.25, 0.5])
  seen = {}

  def predict(x_t, t):
    seen["x_t"] = x_t
    return jnp.full_like(x_t, 2.0)  # exactly the target n - x0
  assert float(objective.flow_loss(predict, x0, noise, sigma, sigma * 1000)) == 0.0
  assert np.allclose(seen["x_t"][:, 0, 0, 0], [1.5, 2.0])  # (1 - s) x0 + s n


def test_caption_dropout():
  y, mask = jnp.ones((64, 3, 2)), jnp.ones((64, 3), jnp.int32)
  null_y, null_mask = jnp.zeros((3, 2)), jnp.array([1, 0, 0])
  all_dropped = objective.drop_captions(jax.random.key(0), y, mask, null_y, null_mask, 1.0)
  assert float(all_dropped[0].sum()) == 0 and np.array_equal(all_dropped[1], np.tile([1, 0, 0], (64, 1)))
  kept = objective.drop_captions(jax.random.key(0), y, mask, null_y, null_mask, 0.0)
  assert kept[0] is y
  some = np.asarray(objective.drop_captions(jax.random.key(0), y, mask, null_y, null_mask, 0.5)[0])
  assert 10 < (some.sum(axis=(1, 2)) == 0).sum() < 54


# ---- the step ------------------------------------------------------------------------------------

def _run_steps(cfg, mesh, steps=2):
  trainer = Trainer(cfg, mesh)
  state = trainer.init()
  losses = []
  for i in range(steps):
    state, metrics = trainer.step(state, trainer.put_batch(batch(cfg, seed=i)), null_text(cfg))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), state, trainer


def test_gradient_accumulation_matches_one_big_batch():
  cfg = tiny.get_config()
  mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])
  losses_1, params_1, _, _ = _run_steps(cfg, mesh, steps=1)
  cfg.grad_accum = 4
  losses_4, params_4, _, _ = _run_steps(cfg, mesh, steps=1)
  assert np.allclose(losses_1, losses_4, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_step_is_skipped_and_counted():
  cfg = tiny.get_config()
  cfg.ema_decay = 0.9
  trainer = Trainer(cfg, parallel.make_mesh(data=1, devices=jax.devices()[:1]))
  state = trainer.init()
  before = jax.device_get(state.params)
  bad = batch(cfg)
  bad["latents"][0, 0, 0, 0] = np.nan
  state, metrics = trainer.step(state, trainer.put_batch(bad), null_text(cfg))
  assert not bool(metrics["finite"]) and int(state.nonfinite) == 1 and int(state.skipped) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
    assert np.array_equal(a, b)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.ema))):
    assert np.array_equal(a, b)  # the EMA starts at the weights and skips the bad step too
  state, metrics = trainer.step(state, trainer.put_batch(batch(cfg)), null_text(cfg))
  assert bool(metrics["finite"]) and int(state.nonfinite) == 0 and int(state.skipped) == 1 and int(state.step) == 2
  params, ema = jax.device_get((state.params, state.ema))
  for p, e, b in zip(jax.tree.leaves(params), jax.tree.leaves(ema), jax.tree.leaves(before)):
    np.testing.assert_allclose(e, 0.9 * b + 0.1 * p, rtol=1e-5, atol=1e-7)


@NEEDS_8
@pytest.mark.slow
def test_sharded_step_equals_single_device_step_and_restores_onto_another_mesh(tmp_path):
  from sana_jax.training.checkpoint import Checkpointer
  cfg = tiny.get_config()
  single = parallel.make_mesh(data=1, devices=jax.devices()[:1])
  mesh_a = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  losses_1, params_1, _, _ = _run_steps(cfg, single)
  losses_a, params_a, state_a, trainer_a = _run_steps(cfg, mesh_a)
  kernel = state_a.params["blocks"]["attn1"]["to_q"]["kernel"]
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
  assert np.allclose(losses_1, losses_a, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_a)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # saved from this mesh, restored onto another shape
  ckpt = Checkpointer(tmp_path)
  ckpt.save(2, state_a, {"position": 2}, cfg)
  ckpt.close()
  mesh_b = parallel.make_mesh(data=8)
  trainer_b = Trainer(cfg, mesh_b)
  restored, data_state = Checkpointer(tmp_path).restore(trainer_b.abstract_state())
  assert data_state == {"position": 2} and int(restored.step) == 2
  kernel = restored.params["blocks"]["attn1"]["to_q"]["kernel"]
  assert kernel.sharding == trainer_b.param_shardings["blocks"]["attn1"]["to_q"]["kernel"]
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(jax.device_get(restored.params))):
    assert np.array_equal(a, b)
  # and training goes on from there as it would have on the first mesh
  _, m_a = trainer_a.step(state_a, trainer_a.put_batch(batch(cfg, seed=5)), null_text(cfg))
  _, m_b = trainer_b.step(restored, trainer_b.put_batch(batch(cfg, seed=5)), null_text(cfg))
  assert np.isclose(float(m_a["loss"]), float(m_b["loss"]), rtol=1e-5)


# ---- whole runs through train.py ---------------------------------------------------------------------

ONE_DEVICE = cpu_env(1)  # what these runs test does not depend on the mesh; one device compiles faster


def train_cmd(workdir, *overrides, config=TINY):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", str(config), "--workdir", str(workdir),
          *overrides]


def run_to_end(workdir, *overrides):
  return subprocess.run(train_cmd(workdir, *overrides), check=True, capture_output=True, cwd=ROOT, env=ONE_DEVICE)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir):
  return {m["step"]: (m["loss"], m["grad_norm"]) for m in metrics(workdir) if "loss" in m}


@pytest.mark.slow
def test_sigkill_and_restart_logs_the_same_losses(tmp_path):
  steps = ["--config.total_steps=12", "--config.checkpoint_every=4", "--config.eval.every=0"]
  run_to_end(tmp_path / "straight", *steps)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(train_cmd(killed, *steps), cwd=ROOT, env=ONE_DEVICE, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:  # kill it once step 4 is safely on disk
    done = os.path.isdir(killed / "checkpoints" / "4") and os.path.exists(killed / "metrics.jsonl")
    if done and max(train_losses(killed), default=0) >= 6:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(train_losses(killed)) < 12
  run_to_end(killed, *steps)
  assert train_losses(killed) == train_losses(tmp_path / "straight")  # bit-exact, every step
  assert sorted(os.listdir(killed / "checkpoints")) == ["12", "4", "8"]


@pytest.mark.slow
def test_sigterm_saves_and_the_run_resumes(tmp_path):
  steps = ["--config.total_steps=200", "--config.checkpoint_every=1000", "--config.eval.every=0"]
  proc = subprocess.Popen(train_cmd(tmp_path, *steps), cwd=ROOT, env=ONE_DEVICE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.exists(tmp_path / "metrics.jsonl") and train_losses(tmp_path)):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "SIGTERM" in out
  saved = int(os.listdir(tmp_path / "checkpoints")[0])
  assert saved < 200  # stopped early, at the step it was on
  assert max(train_losses(tmp_path)) == saved
  # the next start resumes from that checkpoint and goes on to the end
  resumed = ["--config.total_steps=" + str(saved + 2)] + steps[1:]
  run_to_end(tmp_path, *resumed)
  assert sorted(train_losses(tmp_path)) == list(range(1, saved + 3))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def assert_two_processes_train_as_one(tmp_path, *overrides, config=TINY):
  """train.py in two processes of 2 CPU devices each, joined by jax.distributed, logs the losses of one
  process with 4 devices; the run has 4 steps and checkpoints every 2."""
  env = dict(cpu_env(2), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2")
  cmd = train_cmd(tmp_path / "two", *overrides, config=config)
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  subprocess.run(train_cmd(tmp_path / "one", *overrides, config=config), check=True, capture_output=True, cwd=ROOT,
                 env=cpu_env(4))
  two, one = train_losses(tmp_path / "two"), train_losses(tmp_path / "one")
  assert sorted(two) == [1, 2, 3, 4]  # process 0 alone wrote the log: one line per step
  for step in one:
    assert np.allclose(two[step], one[step], rtol=1e-5), (step, two[step], one[step])
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
  assert_two_processes_train_as_one(tmp_path, "--config.total_steps=4", "--config.checkpoint_every=2",
                                    "--config.eval.every=0")


def test_non_finite_run_stops_with_a_clear_error(tmp_path, monkeypatch):
  from sana_jax import data
  from sana_jax.training import loop
  real = data.make_train_iterator

  class Poisoned:  # good batches until step 3, then NaN latents
    def __init__(self, it):
      self.it, self.n = it, 0

    def __next__(self):
      b = dict(next(self.it))
      self.n += 1
      if self.n > 3:
        b["latents"] = np.full_like(b["latents"], np.nan)
      return b

    def get_state(self):
      return self.it.get_state()

    def set_state(self, s):
      self.it.set_state(s)

    skipped = property(lambda self: self.it.skipped)

  monkeypatch.setattr(data, "make_train_iterator", lambda *a, **k: Poisoned(real(*a, **k)))
  cfg = tiny.get_config()
  cfg.total_steps, cfg.checkpoint_every, cfg.max_nonfinite_steps, cfg.eval.every = 20, 2, 3, 0
  with pytest.raises(SanaError, match="non-finite for 3 steps in a row at step 6"):
    loop.train(cfg, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # the stop saved nothing


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
  for args in (["--config", "configs/missing.py", "--workdir", str(tmp_path)],
               ["--config", "configs/tiny.py", "--workdir", str(tmp_path), "--config.no_such_key=1"],
               ["--config", "configs/tiny.py"]):
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_sweep_expands_into_commands(tmp_path):
  from sana_jax.training import sweep
  base, runs = sweep.load(os.path.join(ROOT, "configs/sweeps/tiny_lr.py"))
  cmds = sweep.commands(base, runs, str(tmp_path))
  assert len(cmds) == 4 and len({c[c.index("--workdir") + 1] for c in cmds}) == 4
  assert any("--config.optim.lr=0.0003" in c and "--config.objective.logit_std=1.3" in c for c in cmds)
  out = subprocess.run([sys.executable, "-m", "sana_jax.training.sweep", "configs/sweeps/tiny_lr.py", "--workdir",
                        str(tmp_path), "--print"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0 and len(out.stdout.strip().splitlines()) == 4
  bad = subprocess.run([sys.executable, "-m", "sana_jax.training.sweep", "nope.py", "--workdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.startswith("error: ")
