#!/bin/bash
# The demo recipe on one GPU, reusing the shipped tokenizer, text encoder and DC-AE (trained by the
# CPU recipe) and training the DiT longer on more images:
#   bash sana_jax/demo/recipe_gpu.sh WORK OUT IMAGES STEPS BATCH LAYERS SECONDS [TEXT]
# SECONDS bounds train.py's wall time: SIGTERM makes it checkpoint and stop; the last checkpoint ships.
# TEXT: a directory with tokenizer/ and text_encoder/ to use instead of the shipped ones (e.g. the
# side-target encoder of `python -m sana_jax.demo.text_encoder --side-targets`; README "The demo model").
# EXTRA (environment): more configs/demo_shapes.py arguments, e.g. EXTRA=pe for the position embedding.
set -u
work=$1 out=$2 images=$3 steps=$4 batch=$5 layers=$6 seconds=$7 text=${8:-sana_jax/assets/sana-shapes}
asset=sana_jax/assets/sana-shapes
mkdir -p $work/parts
cp -r $text/tokenizer $text/text_encoder $asset/vae $work/parts/
python3 - "$work" "$text" <<'PY'
import json, sys
log = {"parts/tokenizer": {"reused": sys.argv[2], "seconds": 0},
       "parts/vae": {"reused": "sana_jax/assets/sana-shapes", "seconds": 0}}
json.dump(log, open(f"{sys.argv[1]}/recipe.json", "w"), indent=1)
PY
python3 -m sana_jax.demo.recipe --work $work --images $images --stop-after data || exit 1
start=$(date +%s)
timeout -s TERM $seconds python3 train.py --workdir $work/dit \
  --config "configs/demo_shapes.py:latents=$work/data,steps=$steps,batch=$batch,layers=$layers${EXTRA:+,$EXTRA}"
python3 - "$work" "$start" <<'PY'
import json, sys, time
work, start = sys.argv[1], float(sys.argv[2])
log = json.load(open(f"{work}/recipe.json"))
rows = [json.loads(l) for l in open(f"{work}/dit/metrics.jsonl")]
log["dit"] = {"last_metrics": rows[-1], "last_step": max(r.get("step", 0) for r in rows),
              "seconds": round(time.time() - start, 1)}
json.dump(log, open(f"{work}/recipe.json", "w"), indent=1)
PY
python3 -m sana_jax.demo.recipe --work $work --images $images --layers $layers --batch $batch
tar -C $work -cf $out/ship.tar ship
cp $work/recipe.json $work/dit/metrics.jsonl $out/
cp $work/eval/report.json $out/ 2>/dev/null; cp $work/eval/*.png $out/ 2>/dev/null
ls -la $out
