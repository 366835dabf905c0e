//! SGD as `torch.optim.SGD` (single-tensor path): momentum, dampening, Nesterov, L2 decay.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::common::{check, check_non_negative, check_positive, check_unit_half_open, l2_grad};
use super::{Buffers, OptimError, OptimizerSpec, Result, UpdateRule};

const MOMENTUM_BUFFER: &str = "momentum_buffer";

/// `torch.optim.SGD` hyper-parameters; defaults are PyTorch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

impl UpdateRule for SgdConfig {
    fn validate(&self, model: &str) -> Result<()> {
        check_positive(model, "lr", self.lr)?;
        check_unit_half_open(model, "momentum", self.momentum)?;
        let dampening_ok = (0.0..=1.0).contains(&self.dampening);
        check(
            model,
            "dampening",
            self.dampening,
            dampening_ok,
            "in [0, 1]",
        )?;
        check_non_negative(model, "weight_decay", self.weight_decay)?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(OptimError::InvalidCombination {
                model: model.to_string(),
                field: "nesterov",
                reason: "Nesterov momentum requires momentum > 0 and dampening 0",
            });
        }
        Ok(())
    }

    fn initial_lr(&self) -> f64 {
        self.lr
    }

    fn to_spec(&self) -> OptimizerSpec {
        OptimizerSpec::Sgd(self.clone())
    }

    fn from_spec(spec: &OptimizerSpec) -> Option<Self> {
        match spec {
            OptimizerSpec::Sgd(c) => Some(c.clone()),
            _ => None,
        }
    }

    fn buffer_names(&self) -> Vec<&'static str> {
        if self.momentum != 0.0 {
            vec![MOMENTUM_BUFFER]
        } else {
            Vec::new()
        }
    }

    fn update(
        &self,
        lr: f64,
        _step: u64,
        param: &Tensor,
        grad: &Tensor,
        buffers: &mut Buffers,
    ) -> candle_core::Result<Tensor> {
        let mut grad = l2_grad(grad, param, self.weight_decay)?;
        if self.momentum != 0.0 {
            let buf = match buffers.get(MOMENTUM_BUFFER) {
                // First step: torch.clone(grad), no dampening.
                None => grad.copy()?,
                // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                Some(buf) => {
                    (buf.affine(self.momentum, 0.0)? + grad.affine(1.0 - self.dampening, 0.0)?)?
                }
            };
            buffers.insert(MOMENTUM_BUFFER, buf.clone());
            grad = if self.nesterov {
                // grad.add(buf, alpha=momentum)
                (grad + buf.affine(self.momentum, 0.0)?)?
            } else {
                buf
            };
        }
        // param.add_(grad, alpha=-lr)
        param + grad.affine(-lr, 0.0)?
    }
}
