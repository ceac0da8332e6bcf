#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the pipeline on real Hippocampus MRI.
#   bash demo.sh --source ../shared/data/Hippocampus
set -euo pipefail
cd "$(dirname "$0")"
SOURCE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --source) SOURCE="$2"; shift 2 ;;
    *) echo "unknown argument $1 (usage: bash demo.sh --source DIR)" >&2; exit 2 ;;
  esac
done
if [ -z "$SOURCE" ]; then
  echo "give the Hippocampus data folder: bash demo.sh --source ../shared/data/Hippocampus" >&2
  exit 2
fi
export OMP_WAIT_POLICY=PASSIVE
export LATDIFF_RAW="${LATDIFF_RAW:-$PWD/latdiff_data/raw}"
export LATDIFF_PREPROCESSED="${LATDIFF_PREPROCESSED:-$PWD/latdiff_data/preprocessed}"
export LATDIFF_RESULTS="${LATDIFF_RESULTS:-$PWD/latdiff_data/results}"

python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python dataset_conversion/convert_hippocampus.py --source "$SOURCE"
latdiff_plan_and_preprocess -d 4 --verify_dataset_integrity --preset tiny
echo "raw data:          $LATDIFF_RAW/Dataset004_Hippocampus"
echo "plans and arrays:  $LATDIFF_PREPROCESSED/Dataset004_Hippocampus"
