//! Lion as lion-pytorch's `Lion` (`update_fn`): sign of an interpolated momentum, decoupled
//! weight decay `p *= 1 - lr * weight_decay`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::common::{buffer_or_zeros, check_betas, check_non_negative, check_positive};
use super::{Buffers, OptimizerSpec, Result, UpdateRule};

const EXP_AVG: &str = "exp_avg";

/// lion-pytorch `Lion` hyper-parameters; defaults are lion-pytorch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LionConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub weight_decay: f64,
    /// lion-pytorch's `decoupled_weight_decay`: divide `weight_decay` by the initial lr, so
    /// the decay per step is `weight_decay * lr / initial_lr`.
    pub decoupled_weight_decay: bool,
}

impl Default for LionConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: (0.9, 0.99),
            weight_decay: 0.0,
            decoupled_weight_decay: false,
        }
    }
}

impl UpdateRule for LionConfig {
    fn validate(&self, model: &str) -> Result<()> {
        check_positive(model, "lr", self.lr)?;
        check_betas(model, self.betas)?;
        check_non_negative(model, "weight_decay", self.weight_decay)
    }

    fn initial_lr(&self) -> f64 {
        self.lr
    }

    fn to_spec(&self) -> OptimizerSpec {
        OptimizerSpec::Lion(self.clone())
    }

    fn from_spec(spec: &OptimizerSpec) -> Option<Self> {
        match spec {
            OptimizerSpec::Lion(c) => Some(c.clone()),
            _ => None,
        }
    }

    fn buffer_names(&self) -> Vec<&'static str> {
        vec![EXP_AVG]
    }

    fn update(
        &self,
        lr: f64,
        _step: u64,
        param: &Tensor,
        grad: &Tensor,
        buffers: &mut Buffers,
    ) -> candle_core::Result<Tensor> {
        let (beta1, beta2) = self.betas;
        let weight_decay = if self.decoupled_weight_decay {
            self.weight_decay / self.lr
        } else {
            self.weight_decay
        };
        let exp_avg = buffer_or_zeros(buffers, EXP_AVG, param)?;
        // p.data.mul_(1 - lr * wd)
        let param = param.affine(1.0 - lr * weight_decay, 0.0)?;
        // update = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_()
        let update = (exp_avg.affine(beta1, 0.0)? + grad.affine(1.0 - beta1, 0.0)?)?.sign()?;
        // exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        let exp_avg = (exp_avg.affine(beta2, 0.0)? + grad.affine(1.0 - beta2, 0.0)?)?;
        buffers.insert(EXP_AVG, exp_avg);
        // p.add_(update, alpha=-lr)
        param + update.affine(-lr, 0.0)?
    }
}
