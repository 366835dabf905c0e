//! The reference's adaptive loss weighting (`VAETrainer._compute_adaptive_weight` over
//! `FloatBuffer(100)` histories): each weight is the mean of the positive running means
//! divided by its own running mean.

use serde::{Deserialize, Serialize};

/// A rolling window of the last `capacity` values (fluxflow-training's `FloatBuffer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollingMean {
    pub capacity: usize,
    pub items: Vec<f64>,
}

impl RollingMean {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            items: Vec::new(),
        }
    }

    pub fn push(&mut self, v: f64) {
        self.items.push(v);
        if self.items.len() > self.capacity {
            self.items.remove(0);
        }
    }

    /// Left-to-right sum over the count, as Python's `sum(items) / len(items)`; 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.items.is_empty() {
            0.0
        } else {
            self.items.iter().fold(0.0, |a, b| a + b) / self.items.len() as f64
        }
    }
}

/// Histories of the recon and KL losses and the weights derived from them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveWeights {
    pub enabled: bool,
    pub recon: RollingMean,
    pub kl: RollingMean,
}

impl AdaptiveWeights {
    /// The reference's window of 100 values.
    pub fn new(enabled: bool, window: usize) -> Self {
        Self {
            enabled,
            recon: RollingMean::new(window),
            kl: RollingMean::new(window),
        }
    }

    /// Records one step's losses.
    pub fn record(&mut self, recon: f64, kl: f64) {
        self.recon.push(recon);
        self.kl.push(kl);
    }

    /// (w_recon, w_kl) from the histories; (1, 1) when disabled.
    pub fn weights(&self) -> (f64, f64) {
        if !self.enabled {
            return (1.0, 1.0);
        }
        let means = [self.recon.mean(), self.kl.mean()];
        let positive: Vec<f64> = means.iter().copied().filter(|m| *m > 0.0).collect();
        let weight = |avg: f64| -> f64 {
            if avg == 0.0 {
                return 1.0;
            }
            let total = positive.iter().fold(0.0, |a, b| a + b);
            if total > 0.0 && !positive.is_empty() {
                (total / positive.len() as f64) / (avg + 1e-8)
            } else {
                1.0
            }
        };
        (weight(means[0]), weight(means[1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_drops_the_oldest_value() {
        let mut r = RollingMean::new(2);
        r.push(1.0);
        r.push(2.0);
        r.push(4.0);
        assert_eq!(r.mean(), 3.0);
    }

    #[test]
    fn weights_balance_the_two_losses() {
        let mut a = AdaptiveWeights::new(true, 100);
        a.record(3.0, 1.0);
        let (wr, wk) = a.weights();
        assert!((wr - 2.0 / (3.0 + 1e-8)).abs() < 1e-15);
        assert!((wk - 2.0 / (1.0 + 1e-8)).abs() < 1e-15);
        assert_eq!(AdaptiveWeights::new(false, 100).weights(), (1.0, 1.0));
    }
}
