#!/usr/bin/env bash
# The README walkthrough end to end on real data: folder -> train -> predict -> evaluate.
# Needs the stardist wheel's data files (pip install --no-deps stardist); nothing is downloaded.
# Usage: bash examples/nuclei_walkthrough.sh [WORK_DIR]    (KERAS_BACKEND picks the backend)
set -euo pipefail
work=${1:-nuclei_work}
here=$(cd "$(dirname "$0")" && pwd)

python "$here/nuclei_folder.py" "$work/data"
kunet train --images "$work/data/train/images" --masks "$work/data/train/masks" \
            --out "$work/run" ${TIME_BUDGET:+--time-budget "$TIME_BUDGET"}
kunet predict --model "$work/run/best.keras" --images "$work/data/test/images" --out "$work/pred"
kunet evaluate --model "$work/run/best.keras" --images "$work/data/test/images" \
               --masks "$work/data/test/masks" --json
