//! The arithmetic of our Triton kernels (`src/model/ops/triton/`), checked on the CPU: the
//! kernel source the CUDA build compiles to cubins, run by Triton's interpreter against the
//! math in float64, forward and backward (the optimizer's: the update and the sum of squares;
//! BSFA's: the projection of a step's blocks),
//! at odd shapes (`scripts/check_triton_kernels.py`, which states the cases and tolerances).
//! Needs `BSFA_PYTHON` with torch and triton (`scripts/install_test_tools.sh`); skips without
//! it unless `BSFA_REQUIRE_TOOLS` is set.

mod common;

use common::tools::tool;
use std::process::Command;

fn check(broken: Option<&str>) -> Option<(bool, String)> {
    let python = tool("BSFA_PYTHON", &[])?;
    let mut command = Command::new(python);
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/check_triton_kernels.py"
        ))
        .env("TRITON_INTERPRET", "1");
    if let Some(kernel) = broken {
        // The two smallest cases of its family suffice to see it fail.
        command.args(["--break", kernel, "--cases", "2"]);
    }
    let out = command.output().expect("running check_triton_kernels.py");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Some((out.status.success(), text))
}

#[test]
fn every_kernel_matches_the_math_in_f32_and_bf16() {
    if let Some((ok, output)) = check(None) {
        assert!(ok, "{output}");
        assert!(output.contains("0 case(s) beyond tolerance"), "{output}");
    }
}

/// The check can fail: a perturbed result of each kernel is caught.
#[test]
fn a_broken_kernel_fails_the_check() {
    let kernels = [
        "forward",
        "dq",
        "dkdv",
        "lse",
        "grad",
        "rms_norm",
        "rms_norm_dx",
        "rms_norm_dw",
        "add_rms_norm_sum",
        "add_rms_norm",
        "rms_norm_dx_add",
        "swiglu",
        "swiglu_grad",
        "adamw_theta",
        "adamw_m",
        "adamw_v",
        "adam_mini_theta",
        "adam_mini_m",
        "adam_mini_v",
        "sum_squares",
        "bsfa_coordinates",
        "bsfa_update",
        "bsfa_apply",
    ];
    for kernel in kernels {
        if let Some((ok, output)) = check(Some(kernel)) {
            assert!(!ok, "--break {kernel} passed: {output}");
        }
    }
}
