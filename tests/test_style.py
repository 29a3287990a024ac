"""The house rules that a machine can check: ruff's configuration in pyproject.toml, and the direction
imports flow in (models never import the converters or the pipeline at module level; converters never
import the pipeline), so that loading goes pipeline -> convert -> models and nowhere back."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
  r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr


def module_level_imports(path):
  tree = ast.parse(path.read_text(encoding="utf-8"))
  for node in tree.body:  # module level only: a lazy import inside a function is a thin entry point
    if isinstance(node, ast.ImportFrom) and node.module:
      yield from (f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names)


def test_loading_flows_one_way():
  rules = {"sana_jax/models": ("sana_jax.convert", "sana_jax.pipeline", "sana_jax.training"),
           "sana_jax/convert": ("sana_jax.pipeline", "sana_jax.training")}
  bad = []
  for folder, banned in rules.items():
    for path in sorted((ROOT / folder).glob("*.py")):
      bad += [f"{path.relative_to(ROOT)}: {name}" for name in module_level_imports(path) if name.startswith(banned)]
  assert not bad, bad
