#!/usr/bin/env bash
# The demo, step by step with the cdmap CLI. Usage: bash examples/walkthrough.sh [WORKDIR]
set -euo pipefail
work=${1:-walkthrough_out}
mkdir -p "$work"

# 1. synthetic data: LEVIR-CD style tiles and a georeferenced scene pair with a truth raster
python - "$work" <<'PY'
import sys
from cdmap.synthetic import write_scene_pair, write_tile_set
root = sys.argv[1]
write_tile_set(f"{root}/tiles", n_train=48, n_val=12, n_test=12, size=128)
write_scene_pair(f"{root}/scene", height=1024, width=1280)
PY

# 2. train (reference recipe, shortened for a CPU) and look at the checkpoint
cdmap train "$work/tiles" -o "$work/run" --epochs 25 --batch-size 8 --effective-batch 8 --crop-size 128 \
    --backbone-lr 1e-3 --workers 0 --overwrite
cdmap info "$work/run/best.pt"

# 3. map change over the scene: probability, mask, polygons (GeoPackage) and run.json
cdmap predict "$work/scene/before.tif" "$work/scene/after.tif" -o "$work/prediction" \
    --model "$work/run/best.pt" --tile-size 128 --min-area 20 --overwrite

# 4. polygons again from the probability raster, at another threshold, as GeoJSON (WGS84)
cdmap vectorize "$work/prediction/change_probability.tif" -o "$work/changes_0.7.geojson" --threshold 0.7 \
    --simplify 0.5 --overwrite

# 5. scores: on the held-out test tiles, and on the whole scene against the truth raster
cdmap evaluate "$work/tiles" --model "$work/run/best.pt" --split test
cdmap evaluate --scene "$work/scene/before.tif" "$work/scene/after.tif" "$work/scene/truth.tif" \
    --model "$work/run/best.pt" --tile-size 128
