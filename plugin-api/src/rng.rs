//! Deterministic randomness for augmentations: the host hands each call a seed derived from
//! (train.seed, epoch, step, component), so runs and resumed runs draw the same numbers.

use rand::SeedableRng;
pub use rand::{Rng, RngCore};
pub use rand_chacha::ChaCha8Rng as StepRng;

/// The generator an augmentation uses for one batch.
pub fn step_rng(seed: u64) -> StepRng {
    StepRng::seed_from_u64(seed)
}

/// Mixes several integers into one seed (SplitMix64 finaliser over the sequence).
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_by_each_part_and_repeat() {
        assert_eq!(mix_seed(&[1, 2, 3]), mix_seed(&[1, 2, 3]));
        assert_ne!(mix_seed(&[1, 2, 3]), mix_seed(&[1, 2, 4]));
        assert_ne!(mix_seed(&[1, 2, 3]), mix_seed(&[2, 1, 3]));
        let a: u64 = step_rng(7).gen();
        let b: u64 = step_rng(7).gen();
        assert_eq!(a, b);
    }
}
