#!/usr/bin/env bash
# The whole path a user walks, offline, on a fresh clone:
#   set-up → demo data (MNI152 template inside nilearn) → train → held-out evaluation → inference → CSV
# Idempotent: the data set is built once; an interrupted or finished run is resumed (a no-op when done).
# Environment: DEMO_DATA (default data/demo), DEMO_RUN (default runs/demo), DEMO_CONFIG (configs/demo.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh

DATA="${DEMO_DATA:-data/demo}"
RUN="${DEMO_RUN:-runs/demo}"
CONFIG="${DEMO_CONFIG:-configs/demo.yaml}"
START=$SECONDS

echo "== 1/4 demo data: $DATA"
python scripts/make_demo_data.py "$DATA"

echo "== 2/4 training: $RUN"
RESUME=()
[ -f "$RUN/last.pt" ] && RESUME=(--resume)
volumetric-train "$DATA/train" --config "$CONFIG" --output-dir "$RUN" --no-progress "${RESUME[@]}"

echo "== 3/4 held-out evaluation on $DATA/test (scans never seen in training)"
volumetric-evaluate "$RUN/best.pt" "$DATA/test" --output-dir "$RUN/test" --no-progress > /dev/null

echo "== 4/4 inference on three single scans"
mapfile -t SCANS < <(find "$DATA/test" -name '*.nii.gz' | sort | awk 'NR % 33 == 1' | head -n 3)
volumetric-infer "$RUN/best.pt" "${SCANS[@]}" --output "$RUN/predictions.csv" --no-progress

python - "$RUN" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/test/metrics.json"))
print(f"held-out accuracy {m['accuracy']:.3f}  balanced accuracy {m['balanced_accuracy']:.3f}  "
      f"AUROC {m['auroc']:.3f}  ({m['num_scans']} test scans)")
PY
echo "predictions for single scans: $RUN/predictions.csv"
echo "held-out predictions and metrics: $RUN/test/predictions.csv, $RUN/test/metrics.json"
echo "the evaluation's page (metrics, plots, every scan, the worst mistakes with maps): $RUN/test/report.html"
echo "demo finished in $((SECONDS - START)) s"
