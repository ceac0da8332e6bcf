#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the whole pipeline on real Hippocampus MRI.
#   bash demo.sh --source ../shared/data/Hippocampus    (local copy; without --source it downloads MSD Task04)
#   BUDGET_MINUTES=5 bash demo.sh ...                     (training budget, default 15 minutes)
set -euo pipefail
cd "$(dirname "$0")"
SOURCE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --source) SOURCE="$2"; shift 2 ;;
    *) echo "unknown argument $1 (usage: bash demo.sh --source DIR)" >&2; exit 2 ;;
  esac
done
export OMP_WAIT_POLICY=PASSIVE
export LATDIFF_RAW="${LATDIFF_RAW:-$PWD/latdiff_data/raw}"
export LATDIFF_PREPROCESSED="${LATDIFF_PREPROCESSED:-$PWD/latdiff_data/preprocessed}"
export LATDIFF_RESULTS="${LATDIFF_RESULTS:-$PWD/latdiff_data/results}"

python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
latdiff_demo ${SOURCE:+--source "$SOURCE"} --budget-minutes "${BUDGET_MINUTES:-15}"
