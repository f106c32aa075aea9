#!/usr/bin/env bash
# The BSFA reproduction study (scripts/reproduce_bsfa.py): builds the binary, then runs the study.
#   scripts/reproduce_bsfa.sh [--quick] [--out DIR] [--jobs 2] [--estimate] [--report] [-- training flags]
# Resumable: rerun the same command to continue. `scripts/reproduce_bsfa.py --help` lists every
# option; docs/bsfa.md has the protocol and the results.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec python3 scripts/reproduce_bsfa.py "$@"
