#!/bin/bash
# What a lent GPU machine runs for the kernel and train-step benchmarks (see docs/benchmarks.md).
# Usage there: bash bench/gpu_session.sh OUTDIR   (carry .whl: diffusers, ml_collections, grain, ...)
out=${1:-/tmp/out}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi -L
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
timeout 100 python3 bench/linear_attention.py --check 2>&1 | tee $out/check.log
timeout 160 python3 bench/linear_attention.py --sweep --repeats 10 2>&1 | tee $out/sweep.log
timeout 110 python3 bench/linear_attention.py --repeats 20 2>&1 | tee $out/bench.log
timeout 180 python3 bench/train_step.py --preset gpu 2>&1 | tee $out/train.log
timeout 300 python3 bench/sprint.py --preset gpu 2>&1 | tee $out/sprint.log
