//! The built-in corpus: a deterministic generator of simple English-like text.
//!
//! It lets `cargo run --release` train with no download. The text has structure at every
//! scale a small model can pick up within a minute: spelling of a closed vocabulary,
//! grammatical sentence templates, and sums whose results follow from their operands.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const NAMES: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
];
const ADJECTIVES: &[&str] = &[
    "red", "small", "quiet", "old", "bright", "heavy", "green", "clever", "lazy", "warm",
];
const NOUNS: &[&str] = &[
    "cat", "dog", "book", "lamp", "river", "garden", "window", "letter", "horse", "clock",
];
const VERBS: &[&str] = &[
    "sees", "finds", "paints", "carries", "follows", "likes", "moves", "watches",
];
const PLACES: &[&str] = &[
    "house", "park", "market", "forest", "station", "library", "harbor", "kitchen",
];
const PREPOSITIONS: &[&str] = &["near", "in", "behind", "under", "beside"];
const NUMBER_WORDS: &[&str] = &[
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// Size of the built-in corpus in bytes (about 1 MB).
pub const BUILTIN_BYTES: usize = 1 << 20;

/// Generates the built-in corpus; the same text on every machine and every call.
pub fn corpus() -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(0xB5FA);
    let mut text = String::with_capacity(BUILTIN_BYTES + 256);
    let pick = |rng: &mut ChaCha8Rng, words: &[&'static str]| -> &'static str {
        words.choose(rng).copied().unwrap_or("")
    };
    while text.len() < BUILTIN_BYTES {
        match rng.random_range(0..4) {
            0 | 1 => {
                let sentence = format!(
                    "{} {} the {} {} {} the {}. ",
                    pick(&mut rng, NAMES),
                    pick(&mut rng, VERBS),
                    pick(&mut rng, ADJECTIVES),
                    pick(&mut rng, NOUNS),
                    pick(&mut rng, PREPOSITIONS),
                    pick(&mut rng, PLACES),
                );
                text.push_str(&sentence);
            }
            2 => {
                let a = rng.random_range(0..50u32);
                let b = rng.random_range(0..50u32);
                text.push_str(&format!("{a} plus {b} is {}. ", a + b));
            }
            _ => {
                let n = rng.random_range(0..10usize);
                let count = format!(
                    "{} has {} {}s. ",
                    pick(&mut rng, NAMES),
                    NUMBER_WORDS[n],
                    pick(&mut rng, NOUNS)
                );
                text.push_str(&count);
            }
        }
        if rng.random_range(0..8) == 0 {
            text.push('\n');
        }
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn deterministic_and_sized() {
        let a = super::corpus();
        assert_eq!(a, super::corpus());
        assert!(a.len() >= super::BUILTIN_BYTES && a.len() < super::BUILTIN_BYTES + 256);
        assert!(a.is_ascii());
    }
}
