//! The presets shipped inside the binary (`configs/*.json`): each a run-config layer with
//! the same keys as `--set`. `config` layers them under `--model NAME`; `VitConfig::preset`
//! reads a ViT preset's `vit` section from here, so each preset is defined once.

/// Every preset, as `(name, JSON)`.
pub const PRESETS: &[(&str, &str)] = &[
    ("tiny", include_str!("../configs/tiny.json")),
    ("llama72m", include_str!("../configs/llama72m.json")),
    ("llama134m", include_str!("../configs/llama134m.json")),
    ("vit-s16", include_str!("../configs/vit-s16.json")),
    ("vit-tiny", include_str!("../configs/vit-tiny.json")),
    // The tests' small model (as torchtitan's debug model): `tiny` at hidden 64, 2 layers,
    // batches of 8 sequences of 64 bytes, every step logged.
    ("test", include_str!("../configs/test.json")),
];

/// The JSON of preset `name`, if there is one.
pub fn find(name: &str) -> Option<&'static str> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, json)| *json)
}
