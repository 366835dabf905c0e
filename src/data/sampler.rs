//! The batch order: one training size per batch, a seeded shuffle per epoch, and a saveable
//! (epoch, position) from which a resumed run continues with exactly the remaining batches.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::rng::SplitMix64;
use super::Dataset;

/// Where the sampler stands: the next batch handed out is batch `position` of epoch `epoch`'s
/// order (`position == batches_per_epoch` means the epoch is done; the next batch is the first
/// of epoch + 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub position: usize,
}

/// Batches of dataset indices, each from one bucket (training size).
///
/// Epoch `e`'s order, from a SplitMix64 stream seeded by (`seed`, `e`): the indices of each
/// bucket (buckets in ascending size) are shuffled and cut into batches of `batch_size`, then
/// the order of all batches is shuffled. A bucket's last batch keeps its remainder as a
/// smaller batch, so every image is seen exactly once per epoch. (The reference instead pools
/// remainders of all buckets into mixed-size batches and drops the last incomplete one; batches
/// of one resolution cannot mix sizes, and dropping would starve buckets smaller than a
/// batch.) The order depends only on the buckets, `batch_size`, `seed` and `e`, with an RNG
/// defined in this crate, so it is identical across runs, builds and platforms.
#[derive(Debug, Clone)]
pub struct BatchSampler {
    buckets: Vec<Vec<usize>>,
    batch_size: usize,
    seed: u64,
    state: SamplerState,
    /// Epoch `state.epoch`'s batches.
    order: Vec<Vec<usize>>,
}

impl BatchSampler {
    /// A sampler over `dataset`'s buckets, at epoch 0, position 0.
    pub fn new(dataset: &Dataset, batch_size: usize, seed: u64) -> Result<Self> {
        Self::from_buckets(dataset.buckets().into_values().collect(), batch_size, seed)
    }

    /// A sampler over explicit buckets (each a list of dataset indices of one training size).
    pub fn from_buckets(buckets: Vec<Vec<usize>>, batch_size: usize, seed: u64) -> Result<Self> {
        if batch_size == 0 {
            bail!("the batch size must be positive, got 0");
        }
        let buckets: Vec<Vec<usize>> = buckets.into_iter().filter(|b| !b.is_empty()).collect();
        let mut s = Self {
            buckets,
            batch_size,
            seed,
            state: SamplerState::default(),
            order: Vec::new(),
        };
        s.order = s.epoch_batches(0);
        Ok(s)
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Batches in every epoch: the sum over buckets of ceil(len / batch_size).
    pub fn batches_per_epoch(&self) -> usize {
        self.buckets
            .iter()
            .map(|b| b.len().div_ceil(self.batch_size))
            .sum()
    }

    /// The complete batch order of epoch `epoch` (independent of the current state).
    pub fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = SplitMix64::for_stream(self.seed, epoch);
        let mut batches = Vec::with_capacity(self.batches_per_epoch());
        for bucket in &self.buckets {
            let mut idx = bucket.clone();
            rng.shuffle(&mut idx);
            batches.extend(idx.chunks(self.batch_size).map(<[usize]>::to_vec));
        }
        rng.shuffle(&mut batches);
        batches
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Continues from `state` (as saved by [`state`](Self::state) under the same dataset,
    /// batch size and seed). A position past the end of the epoch is an error.
    pub fn restore(&mut self, state: SamplerState) -> Result<()> {
        let n = self.batches_per_epoch();
        if state.position > n {
            bail!(
                "cannot resume the data order at batch {} of epoch {}: an epoch has only {n} \
                 batches (did the dataset or batch size change?)",
                state.position,
                state.epoch
            );
        }
        if state.epoch != self.state.epoch {
            self.order = self.epoch_batches(state.epoch);
        }
        self.state = state;
        Ok(())
    }

    /// The next batch, rolling into the next epoch after the last one; None only when the
    /// sampler has no images at all.
    pub fn next_batch(&mut self) -> Option<Vec<usize>> {
        if self.order.is_empty() {
            return None;
        }
        if self.state.position >= self.order.len() {
            self.state = SamplerState {
                epoch: self.state.epoch + 1,
                position: 0,
            };
            self.order = self.epoch_batches(self.state.epoch);
        }
        let batch = self.order[self.state.position].clone();
        self.state.position += 1;
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(seed: u64) -> BatchSampler {
        BatchSampler::from_buckets(vec![(0..7).collect(), (7..10).collect()], 3, seed).unwrap()
    }

    #[test]
    fn partial_batches_are_kept_per_bucket() {
        let s = sampler(1);
        assert_eq!(s.batches_per_epoch(), 3 + 1);
        let mut sizes: Vec<usize> = s.epoch_batches(0).iter().map(Vec::len).collect();
        sizes.sort();
        assert_eq!(sizes, vec![1, 3, 3, 3]);
    }

    #[test]
    fn zero_batch_size_and_positions_past_the_end_are_refused() {
        assert!(BatchSampler::from_buckets(vec![vec![0]], 0, 0).is_err());
        let mut s = sampler(1);
        assert!(s
            .restore(SamplerState {
                epoch: 0,
                position: 5
            })
            .is_err());
        assert!(s
            .restore(SamplerState {
                epoch: 3,
                position: 4
            })
            .is_ok());
    }

    #[test]
    fn an_empty_sampler_yields_nothing() {
        let mut s = BatchSampler::from_buckets(vec![vec![]], 2, 0).unwrap();
        assert_eq!(s.batches_per_epoch(), 0);
        assert_eq!(s.next_batch(), None);
    }
}
