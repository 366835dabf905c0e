//! The reference's adaptive loss weighting (`VAETrainer._compute_adaptive_weight` over
//! `FloatBuffer(100)` histories): each weight is the mean of the positive running means
//! divided by its own running mean.

use candle_core::{DType, Result, Tensor};
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

    /// The mean after pushing `v`, a float64 scalar tensor on any device, computed there with
    /// the same operations as [`RollingMean::mean`] (the left fold of the values kept, `v`
    /// last), so that the value is bit for bit the one the host would compute.
    pub fn mean_with(&self, v: &Tensor) -> Result<Tensor> {
        let skip = (self.items.len() + 1).saturating_sub(self.capacity);
        let kept = &self.items[skip..];
        let sum = kept.iter().fold(0.0, |a, b| a + b);
        // A true division (`Tensor / f64` multiplies by the reciprocal).
        let n = Tensor::new((kept.len() + 1) as f64, v.device())?;
        (v + sum)?.div(&n)
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

    /// The weights [`AdaptiveWeights::weights`] would give after recording `recon` and `kl`,
    /// computed on their device in float64 without reading them back (so the training step
    /// needs no host synchronisation before its backward pass). Detached: as in the reference,
    /// no gradient flows through the weights. Returns float64 scalar tensors.
    pub fn weights_with(&self, recon: &Tensor, kl: &Tensor) -> Result<(Tensor, Tensor)> {
        let dev = recon.device();
        let f64s = |t: &Tensor| t.detach().to_dtype(DType::F64);
        if !self.enabled {
            let one = Tensor::new(1f64, dev)?;
            return Ok((one.clone(), one));
        }
        let means = [
            self.recon.mean_with(&f64s(recon)?)?,
            self.kl.mean_with(&f64s(kl)?)?,
        ];
        let zero = Tensor::new(0f64, dev)?;
        let one = Tensor::new(1f64, dev)?;
        // Sum and count of the positive means, in the host's order (recon, then kl): adding a
        // masked-out mean adds exactly zero.
        let positive: Vec<Tensor> = means.iter().map(|m| m.gt(&zero)).collect::<Result<_>>()?;
        let mut total = zero.clone();
        let mut count = zero.clone();
        for (m, p) in means.iter().zip(&positive) {
            total = (total + p.where_cond(m, &zero)?)?;
            count = (count + p.where_cond(&one, &zero)?)?;
        }
        let usable = total.gt(&zero)?.mul(&count.gt(&zero)?)?;
        let weight = |avg: &Tensor| -> Result<Tensor> {
            let w = ((&total / &count.maximum(&one)?)? / (avg + 1e-8)?)?;
            let w = usable.where_cond(&w, &one)?;
            avg.eq(&zero)?.where_cond(&one, &w)
        };
        Ok((weight(&means[0])?, weight(&means[1])?))
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

    #[test]
    fn device_weights_equal_the_host_weights_bit_for_bit() {
        let dev = candle_core::Device::Cpu;
        let s = |v: f64| Tensor::new(v, &dev).unwrap();
        let get = |t: Tensor| t.to_scalar::<f64>().unwrap();
        // A window that fills and drops values, zero and negative means, a disabled one.
        let mut a = AdaptiveWeights::new(true, 3);
        let values = [
            (0.3f64, 1e-3f64),
            (0.25, 0.0),
            (0.0, 0.0),
            (0.21, -1e-4),
            (0.19, 2e-3),
            (1e-9, 5e-4),
        ];
        for (r, k) in values {
            let (wr, wk) = a.weights_with(&s(r), &s(k)).unwrap();
            let mut host = a.clone();
            host.record(r, k);
            assert_eq!((get(wr), get(wk)), host.weights(), "after ({r}, {k})");
            a = host;
        }
        let off = AdaptiveWeights::new(false, 3);
        let (wr, wk) = off.weights_with(&s(0.3), &s(0.1)).unwrap();
        assert_eq!((get(wr), get(wk)), (1.0, 1.0));
    }
}
