//! Where a run's training data stands after a step: saved in checkpoints, so a resumed run
//! draws exactly the batches the uninterrupted one would have.

use super::images::pipeline::ImagePosition;
use serde::{Deserialize, Serialize};

/// Where a [`super::Batcher`] stands in its random stream of token windows: the seed and how
/// many 32-bit words its ChaCha8 generator has produced. Restoring it replays the exact same
/// windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPosition {
    pub seed: u64,
    pub word_pos: u128,
}

/// Where a run's data stands: its token windows (their seed alone for image runs) and, for
/// image runs, the image pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The token windows' position.
    pub tokens: TokenPosition,
    /// The image pipeline's, for image runs.
    pub images: Option<ImagePosition>,
}

impl Position {
    /// The start of a token stream drawn with `seed`.
    pub fn tokens_from(seed: u64) -> Self {
        Self {
            tokens: TokenPosition { seed, word_pos: 0 },
            images: None,
        }
    }

    /// The start of an image stream drawn with `seed`.
    pub fn images_from(seed: u64) -> Self {
        Self {
            images: Some(ImagePosition::start(seed)),
            ..Self::tokens_from(seed)
        }
    }
}
