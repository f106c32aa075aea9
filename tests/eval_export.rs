//! `eval` reads llm.c-style windows and averages per token; `export` writes a Hugging Face
//! folder whose config and tensor names are those of `LlamaForCausalLM`.

mod common;

use bsfa_train::checkpoint::{read_safetensors, Checkpoint};
use bsfa_train::data::{builtin, shards};
use bsfa_train::model::Llama;
use bsfa_train::train;
use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, ok_summary, read_json, run, stderr};
use std::path::Path;

/// A checkpoint of a few steps of training.
fn trained(dir: &Path) -> std::path::PathBuf {
    let config = common::small_config(&dir.join("run"), &["train.steps=3"]);
    train::run(&config, None).unwrap();
    dir.join("run/checkpoints/step-00000003")
}

#[test]
fn eval_averages_the_loss_over_non_overlapping_windows_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let text: String = builtin::corpus().chars().take(1000).collect();
    let ids: Vec<u32> = text.bytes().map(u32::from).collect();
    let shard_dir = dir.path().join("shards");
    std::fs::create_dir(&shard_dir).unwrap();
    let shard = shard_dir.join("bytes_val_000000.bin");
    shards::write(&shard, &ids, 256).unwrap();
    let text_file = dir.path().join("val.txt");
    std::fs::write(&text_file, &text).unwrap();

    // By definition: window i is ids[i*32 .. i*32 + 33], all in one batch.
    let seq = 32;
    let windows = (ids.len() - 1) / seq;
    let ck = Checkpoint::open(&ckpt, false).unwrap();
    let (model, params) = Llama::new(&ck.state.config.model, DType::F32, &Device::Cpu, 0).unwrap();
    ck.load_model(&params).unwrap();
    let rows = |offset: usize| -> Vec<u32> {
        (0..windows)
            .flat_map(|i| ids[i * seq + offset..i * seq + offset + seq].to_vec())
            .collect()
    };
    let inputs = Tensor::from_vec(rows(0), (windows, seq), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(rows(1), (windows, seq), &Device::Cpu).unwrap();
    let expected = model
        .loss(&inputs, &targets)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;

    let ckpt = ckpt.to_str().unwrap();
    // Batches of 5 leave a smaller last batch: the mean must still be per token.
    for data in [
        format!("shards:{}", shard_dir.display()),
        format!("shards:{}", shard.display()),
        format!("text:{}", text_file.display()),
    ] {
        let report = ok_summary(run(&[
            "eval",
            "--checkpoint",
            ckpt,
            "--data",
            &data,
            "--seq-len",
            "32",
            "--batch-size",
            "5",
        ]));
        let loss = report["val_loss"].as_f64().unwrap();
        assert!(
            (loss - expected).abs() < 1e-5,
            "{data}: {loss} vs {expected}"
        );
        assert_eq!(report["tokens"], (windows * seq) as u64);
    }
    let report = ok_summary(run(&[
        "eval",
        "--checkpoint",
        ckpt,
        "--data",
        &format!("shards:{}", shard.display()),
        "--seq-len",
        "32",
        "--batch-size",
        "5",
        "--eval-batches",
        "2",
    ]));
    assert_eq!(report["tokens"], 2 * 5 * 32);

    // A shard whose ids exceed the model's vocabulary is named.
    let wide = shard_dir.join("wide_val_000000.bin");
    shards::write(&wide, &[1, 2, 300, 4], 1000).unwrap();
    let o = run(&[
        "eval",
        "--checkpoint",
        ckpt,
        "--data",
        &format!("shards:{}", wide.display()),
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("wide_val_000000.bin") && err.contains("id 300"),
        "{err}"
    );
}

#[test]
fn export_writes_a_llama_for_causal_lm_folder() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let out = dir.path().join("hf");
    let export = || {
        run(&[
            "export",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let report = ok_summary(export());
    assert_eq!(report["step"], 3);
    let config = read_json(&out.join("config.json"));
    let ck = Checkpoint::open(&ckpt, false).unwrap();
    let model = &ck.state.config.model;
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["hidden_size"], model.hidden_size);
    assert_eq!(config["intermediate_size"], model.intermediate_size);
    assert_eq!(config["num_hidden_layers"], model.num_hidden_layers);
    assert_eq!(config["num_key_value_heads"], model.kv_heads());
    assert_eq!(config["vocab_size"], model.vocab_size);
    assert_eq!(config["hidden_act"], "silu");

    // Same tensors, same values, under the names transformers expects.
    let (exported, meta) = read_safetensors(&out.join("model.safetensors")).unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    let (original, _) = read_safetensors(&ckpt.join("model.safetensors")).unwrap();
    assert_eq!(exported.len(), original.len());
    for (name, t) in &original {
        assert_eq!(max_abs_diff(t, &exported[name]), 0.0, "{name}");
    }
    assert!(exported.contains_key("model.layers.1.self_attn.q_proj.weight"));
    assert!(exported.contains_key("lm_head.weight"));
    assert!(
        !out.join("tokenizer.json").exists(),
        "bytes runs have no tokenizer.json"
    );

    // Never over an existing export.
    let o = export();
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("already exists"),
        "{err}"
    );
}

/// `export` assembles `<out>.export-tmp` and renames it; one that exists already is not
/// its own (a leftover, another export's, someone's files): it refuses, naming it, and
/// deletes nothing.
#[test]
fn export_never_deletes_a_folder_it_did_not_create() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    // The temporary name is `--out` plus `.export-tmp`, dots in it or not.
    for name in ["hf", "hf.v2"] {
        let out = dir.path().join(name);
        let temp = dir.path().join(format!("{name}.export-tmp"));
        std::fs::create_dir(&temp).unwrap();
        std::fs::write(temp.join("notes.txt"), "mine").unwrap();
        let export = || {
            run(&[
                "export",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
        };
        let o = export();
        let err = stderr(&o);
        assert!(!o.status.success(), "{name}: {err}");
        assert!(err.contains(temp.to_str().unwrap()), "{name}: {err}");
        assert!(err.contains("remove it by hand"), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        let kept = std::fs::read_to_string(temp.join("notes.txt")).unwrap();
        assert_eq!(kept, "mine", "{name}");
        assert!(!out.exists(), "{name}");

        // Once the leftover is gone, the export goes through and leaves no temporary folder.
        std::fs::remove_dir_all(&temp).unwrap();
        ok_summary(export());
        assert!(out.join("model.safetensors").exists(), "{name}");
        assert!(!temp.exists(), "{name}");
    }
}

/// A checkpoint whose config was edited to zero attention heads is refused by `eval`,
/// `export` and `sample` with an error naming the file and the key, not a panic (it
/// divided by zero before: #26 item 9).
#[test]
fn a_checkpoint_config_that_does_not_validate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let trainer = ckpt.join("trainer.json");
    let mut state = read_json(&trainer);
    state["config"]["model"]["num_attention_heads"] = 0.into();
    std::fs::write(&trainer, state.to_string()).unwrap();
    let path = ckpt.to_str().unwrap();
    let out = dir.path().join("hf");
    for args in common::loading_commands(path, out.to_str().unwrap()) {
        let o = run(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains("trainer.json"), "{args:?}: {err}");
        assert!(err.contains("num_attention_heads"), "{args:?}: {err}");
    }
}

/// Valid but huge sizes in a checkpoint's config are refused before anything is allocated,
/// with the memory needed and the memory there is (item 9): not an allocator abort.
#[test]
fn a_checkpoint_config_too_big_for_the_machine_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let trainer = ckpt.join("trainer.json");
    let pristine = read_json(&trainer);
    let path = ckpt.to_str().unwrap();
    let out = dir.path().join("hf");
    for (key, value, needles) in [
        (
            "vocab_size",
            100_000_000_000u64,
            &["loading this model needs at least", "TiB", "MemTotal"][..],
        ),
        (
            "hidden_size",
            4_000_000_000,
            &["overflows 64-bit arithmetic"][..],
        ),
    ] {
        let mut state = pristine.clone();
        state["config"]["model"][key] = value.into();
        std::fs::write(&trainer, state.to_string()).unwrap();
        for args in common::loading_commands(path, out.to_str().unwrap()) {
            let o = run(&args);
            let err = stderr(&o);
            assert!(!o.status.success(), "{args:?}: {err}");
            assert!(!err.contains("memory allocation"), "{args:?}: {err}");
            for needle in [&["trainer.json"][..], needles].concat() {
                assert!(err.contains(needle), "{args:?} with {key}: {err}");
            }
        }
    }
}
