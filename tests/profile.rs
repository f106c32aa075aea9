//! `--profile STEPS`: a Chrome trace of STEPS steps after the first, with the phases of a
//! step as nested spans, readable as the trace event format defines it (`B`/`E` pairs with
//! microsecond timestamps).

mod common;

use common::{run, stderr, test_model};
use serde_json::Value;
use std::collections::BTreeMap;

#[test]
fn a_profile_traces_the_phases_of_the_chosen_steps() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = run(&test_model(&[
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        "--optimizer",
        "adam-mini",
        "--bsfa",
        "--set",
        "bsfa.rank=2",
        "--set",
        "bsfa.history=4",
        "--set",
        "bsfa.interval=2",
        "--profile",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]));
    let stderr = stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("profile of steps 2-4"), "{stderr}");
    let events: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("trace.json")).unwrap()).unwrap();
    // Every span opens and closes, in order, on one thread.
    let mut open: Vec<(String, f64)> = Vec::new();
    let mut spans: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["ph"] == "B" || e["ph"] == "E") {
        let (name, ts) = (
            e["name"].as_str().unwrap().to_string(),
            e["ts"].as_f64().unwrap(),
        );
        if e["ph"] == "B" {
            open.push((name, ts));
        } else {
            let (opened, start) = open.pop().expect("an E without its B");
            assert_eq!(opened, name, "spans must nest");
            assert!(ts >= start);
            spans.entry(name).or_default().push((start, ts));
        }
    }
    assert!(open.is_empty(), "unclosed spans: {open:?}");
    let steps: Vec<String> = events
        .iter()
        .filter(|e| e["name"] == "step" && e["ph"] == "B")
        .map(|e| e["args"]["step"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(steps, ["2", "3", "4"]);
    for phase in [
        "data wait",
        "forward",
        "backward",
        "all-reduce gradients",
        "optimizer",
    ] {
        assert_eq!(spans[phase].len(), 3, "{phase} once per step");
    }
    // One re-estimation in steps 2-4 (in step 3, whose optimizer step is the second after
    // the first, interval 2), one span for all its blocks; a checkpoint and an evaluation
    // after step 3.
    assert_eq!(spans["bsfa re-estimation"].len(), 1);
    assert_eq!(spans["checkpoint"].len(), 1);
    assert_eq!(spans["evaluation"].len(), 1);

    // Without --profile, no trace.
    let plain = dir.path().join("plain");
    let output = run(&test_model(&[
        "--steps",
        "2",
        "--out",
        plain.to_str().unwrap(),
    ]));
    assert!(output.status.success());
    assert!(!plain.join("trace.json").exists());
}
