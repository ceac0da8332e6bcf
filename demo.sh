#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the whole pipeline on real Hippocampus MRI.
#   bash demo.sh --source ../shared/data/Hippocampus    (local copy; without --source it downloads MSD Task04)
#   BUDGET_MINUTES=5 bash demo.sh ...                     (training budget, default 15 minutes)
# It installs into the active virtual or conda environment, else into ./.venv (created once, then
# reused), never into the system Python (which may refuse pip as "externally managed", PEP 668).
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

if [ -n "${VIRTUAL_ENV:-}" ]; then
  echo "demo.sh: installing into the active virtual environment $VIRTUAL_ENV"
elif [ -n "${CONDA_PREFIX:-}" ]; then
  echo "demo.sh: installing into the active conda environment $CONDA_PREFIX"
else
  if [ -x .venv/bin/python ]; then
    echo "demo.sh: installing into the existing virtual environment $PWD/.venv (activate another one to use it instead)"
  else
    echo "demo.sh: creating a virtual environment in $PWD/.venv to install into (activate one first to use it instead)"
    if ! "${PYTHON:-python3}" -m venv .venv; then
      rm -rf .venv  # half-made by this run: a later run must not reuse it
      echo "demo.sh: could not create .venv with ${PYTHON:-python3}; install its venv module (Debian/Ubuntu: apt install python3-venv) or activate an environment first" >&2
      exit 2
    fi
  fi
  . .venv/bin/activate
fi

python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
latdiff_demo ${SOURCE:+--source "$SOURCE"} --budget-minutes "${BUDGET_MINUTES:-15}"
