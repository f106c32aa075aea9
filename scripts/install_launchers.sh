#!/usr/bin/env bash
# Installs the real launchers tests/launchers.rs runs: torchrun (PyTorch 2.15 from PyPI, in a
# virtual environment under target/), and Open MPI's and MPICH's mpirun (Debian packages).
# Prints the variables that point the tests at them; `.ci/run` evaluates its output:
#   eval "$(scripts/install_launchers.sh)"
# About a minute and 5 GB the first time (PyTorch pulls its CUDA libraries); nothing after.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${CARGO_TARGET_DIR:-target}/launchers-venv
if [ ! -x "$venv/bin/torchrun" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.15.0 >&2
fi

if ! command -v mpirun.openmpi >/dev/null || ! command -v mpirun.mpich >/dev/null; then
  sudo=$(command -v sudo || true)
  $sudo apt-get update -qq >&2
  $sudo apt-get install -y -qq --no-install-recommends openmpi-bin mpich >&2
fi

echo "export BSFA_TORCHRUN=$(realpath "$venv/bin/torchrun")"
echo "export BSFA_MPIRUN_OPENMPI=$(command -v mpirun.openmpi)"
echo "export BSFA_MPIRUN_MPICH=$(command -v mpirun.mpich)"
# Fail, instead of skipping, where a launcher is missing.
echo "export BSFA_REQUIRE_LAUNCHERS=1"
