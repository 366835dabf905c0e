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
    pub fn new(decay: f64, params: Vec<(String, Var)>) -> Result<Self> {
        let shadow = params
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
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
            *s = ((&*s * self.decay)? + (var.as_tensor().detach() * keep)?)?;
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
            *s = t.to_dtype(var.dtype())?.to_device(var.device())?;
        }
        Ok(())
    }
}
