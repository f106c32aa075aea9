//! In a CUDA build (`--features cuda`): compiles our Triton kernels (`src/model/ops/triton/`)
//! to cubins with `aot.py` and leaves the Rust table of them, `triton_kernels.rs`, in
//! `OUT_DIR` for `src/model/ops/triton.rs` to include. Needs a Python with the pinned Triton
//! (3.9.0): `BSFA_TRITON_PYTHON`, else `BSFA_PYTHON` (scripts/install_test_tools.sh), else
//! `python3`. `BSFA_TRITON_CUBINS=DIR` takes a table `aot.py --out DIR` made already instead;
//! `BSFA_TRITON_ARCHS` (default 80,90) picks the GPU architectures. Nothing to do otherwise.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/model/ops/triton");
    for var in [
        "BSFA_TRITON_PYTHON",
        "BSFA_PYTHON",
        "BSFA_TRITON_CUBINS",
        "BSFA_TRITON_ARCHS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let table = match std::env::var_os("BSFA_TRITON_CUBINS") {
        Some(dir) => PathBuf::from(dir).join("triton_kernels.rs"),
        None => {
            let dir = out.join("triton");
            let python = ["BSFA_TRITON_PYTHON", "BSFA_PYTHON"]
                .iter()
                .find_map(std::env::var_os)
                .unwrap_or_else(|| "python3".into());
            let status = Command::new(&python)
                .arg("src/model/ops/triton/aot.py")
                .arg("--out")
                .arg(&dir)
                .status();
            match status {
                Ok(s) if s.success() => {}
                found => panic!(
                    "compiling the Triton kernels with {python:?} failed ({found:?}): a CUDA \
                     build needs Python with triton==3.9.0 (pip install triton==3.9.0, or \
                     eval \"$(scripts/install_test_tools.sh)\"; BSFA_TRITON_PYTHON picks the \
                     Python)"
                ),
            }
            dir.join("triton_kernels.rs")
        }
    };
    println!("cargo:rerun-if-changed={}", table.display());
    let text = std::fs::read_to_string(&table)
        .unwrap_or_else(|e| panic!("no Triton kernel table at {}: {e}", table.display()));
    std::fs::write(out.join("triton_kernels.rs"), text).expect("writing OUT_DIR/triton_kernels.rs");
}
