//! What `prepare` wrote, beside a named dataset's published size: documents in total, and
//! tokens in total when the published counts used the same tokenizer. Our validation split
//! is held out by our own rule, so totals are what can be compared.

use crate::data::hub::Published;
use serde_json::{json, Map, Value};

/// Relative difference above which the counts are reported as a warning.
const TOLERANCE: f64 = 0.01;

/// Per split, the documents and tokens written (`splits` as in `meta.json`).
fn ours(splits: &Map<String, Value>, what: &str) -> Vec<(String, u64)> {
    ["train", "val", "test"]
        .into_iter()
        .filter_map(|s| Some((s.to_string(), splits.get(s)?[what].as_u64()?)))
        .collect()
}

/// `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `train 1,234, val 56`.
fn listing(counts: &[(impl AsRef<str>, u64)]) -> String {
    counts
        .iter()
        .map(|(s, n)| format!("{} {}", s.as_ref(), thousands(*n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The line `prepare` ends with: documents, train and validation tokens written.
pub fn summary_line(splits: &Map<String, Value>) -> String {
    let docs = ours(splits, "documents");
    let tokens = ours(splits, "tokens");
    format!(
        "wrote {} documents ({}); tokens: {}",
        thousands(docs.iter().map(|d| d.1).sum()),
        listing(&docs),
        listing(&tokens)
    )
}

/// The published counts beside ours, with a warning for each total that differs by more
/// than 1%: the lines to print and the object `meta.json` keeps.
pub fn compare(
    published: &Published,
    tokenizer: &str,
    splits: &Map<String, Value>,
) -> (Vec<String>, Value) {
    let mut lines = vec![format!(
        "published ({}): documents {}; {} tokens {}",
        published.source,
        listing(published.documents),
        published.tokenizer,
        listing(published.tokens)
    )];
    let mut warnings = Vec::new();
    let mut compared = Map::new();
    let mut check = |what: &str, ours: u64, theirs: u64| {
        let difference = (ours as f64 - theirs as f64) / theirs as f64;
        compared.insert(
            what.into(),
            json!({"written": ours, "published": theirs, "difference": difference}),
        );
        if difference.abs() > TOLERANCE {
            warnings.push(format!(
                "{what}: {} written, {} published ({:+.2}%): more than 1% apart",
                thousands(ours),
                thousands(theirs),
                100.0 * difference
            ));
        }
    };
    let total = |c: &[(&str, u64)]| c.iter().map(|x| x.1).sum::<u64>();
    let written = |what| ours(splits, what).iter().map(|x| x.1).sum::<u64>();
    check(
        "documents",
        written("documents"),
        total(published.documents),
    );
    if published.tokenizer == tokenizer {
        check("tokens", written("tokens"), total(published.tokens));
    }
    lines.extend(warnings.iter().map(|w| format!("warning: {w}")));
    let pairs = |c: &[(&str, u64)]| -> Map<String, Value> {
        c.iter().map(|(s, n)| (s.to_string(), json!(n))).collect()
    };
    let kept = json!({
        "source": published.source,
        "documents": pairs(published.documents),
        "tokenizer": published.tokenizer,
        "tokens": pairs(published.tokens),
        "compared": compared,
        "warnings": warnings,
    });
    (lines, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_more_than_one_percent_apart_warn() {
        let published = Published {
            source: "s",
            documents: &[("train", 1000)],
            tokenizer: "gpt2",
            tokens: &[("train", 90_000), ("val", 10_000)],
        };
        let splits = |docs: u64, tokens: u64| -> Map<String, Value> {
            json!({"train": {"documents": docs - 5, "tokens": tokens - 100},
                   "val": {"documents": 5, "tokens": 100}})
            .as_object()
            .unwrap()
            .clone()
        };
        let (lines, kept) = compare(&published, "gpt2", &splits(1000, 100_900));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(kept["compared"]["tokens"]["written"], 100_900);
        let (lines, kept) = compare(&published, "gpt2", &splits(1011, 100_000));
        assert!(lines[1].contains("documents: 1,011 written, 1,000 published (+1.10%)"));
        assert_eq!(kept["warnings"].as_array().unwrap().len(), 1);
        // Another tokenizer: tokens are not comparable.
        let (_, kept) = compare(&published, "bytes", &splits(1000, 5));
        assert!(kept["compared"].get("tokens").is_none());
        assert_eq!(
            summary_line(&splits(1000, 100_000)),
            "wrote 1,000 documents (train 995, val 5); tokens: train 99,900, val 100"
        );
    }
}
