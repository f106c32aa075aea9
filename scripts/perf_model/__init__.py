"""The GPU performance model of docs/gpu.md, on paper: scripts/gpu_perf_model.py prints it, and
`--check-inventory` compares its graph with the one the Rust code builds (tests/perf_model.rs)."""
