//! Exponential moving average of the VAE weights (fluxflow-training's `EMA`, decay 0.999):
//! `shadow = decay * shadow + (1 - decay) * weight` after each optimizer step.

use candle_core::{Result, Tensor, Var};

/// The shadow copy of a set of parameters.
pub struct Ema {
    pub decay: f64,
    params: Vec<(String, Var)>,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the shadow at the parameters' current values.
    ///
    /// The shadow is detached: a copy of a variable records the copy as an op, and every
    /// update would then chain the previous shadow (and its temporaries) into the graph of the
    /// next, keeping all of them alive: three parameter-sized tensors more every step.
    pub fn new(decay: f64, params: Vec<(String, Var)>) -> Result<Self> {
        let shadow = params
            .iter()
            .map(|(_, v)| v.as_tensor().detach().copy())
            .collect::<Result<_>>()?;
        Ok(Self {
            decay,
            params,
            shadow,
        })
    }

    pub fn update(&mut self) -> Result<()> {
        let keep = 1.0 - self.decay;
        for ((_, var), s) in self.params.iter().zip(self.shadow.iter_mut()) {
            let p = var.as_tensor().detach();
            *s = match crate::train::optim::fused::ema(s, &p, self.decay)? {
                Some(t) => t,
                None => ((&*s * self.decay)? + (p * keep)?)?.detach(),
            };
        }
        Ok(())
    }

    /// The shadow tensors by parameter name.
    pub fn shadow(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.shadow)
            .map(|((n, _), s)| (n.clone(), s.clone()))
            .collect()
    }

    /// Replaces the shadow with saved tensors (converted to each parameter's dtype and
    /// device); every parameter must be present with its shape.
    pub fn load(&mut self, saved: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        for ((name, var), s) in self.params.iter().zip(self.shadow.iter_mut()) {
            let t = saved
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("EMA state lacks {name}")))?;
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "EMA state of {name} has shape {:?}, the model {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            *s = t.to_dtype(var.dtype())?.to_device(var.device())?.detach();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_shadow_holds_no_graph_across_updates() {
        let v = Var::new(&[1f64, 2.0, 3.0], &Device::Cpu).unwrap();
        let mut ema = Ema::new(0.5, vec![("w".into(), v.clone())]).unwrap();
        for step in 0..3 {
            v.set(&Tensor::new(&[2f64, 4.0, 6.0], &Device::Cpu).unwrap())
                .unwrap();
            ema.update().unwrap();
            let (_, s) = &ema.shadow()[0];
            // A shadow that tracked ops would keep every earlier shadow alive.
            assert!(!s.track_op(), "step {step}: the shadow records a graph");
        }
        let (_, s) = &ema.shadow()[0];
        // 1 -> 1.5 -> 1.75 -> 1.875 for the first element.
        assert_eq!(s.to_vec1::<f64>().unwrap(), vec![1.875, 3.75, 5.625]);
    }
}
