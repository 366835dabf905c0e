//! Adam and AdamW as `torch.optim.Adam` / `torch.optim.AdamW` (single-tensor path).
//!
//! Adam's weight decay is an L2 term added to the gradient; AdamW's is decoupled,
//! `p *= 1 - lr * weight_decay` before the moment update.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::common::{
    buffer_or_zeros, check_betas, check_non_negative, check_positive, l2_grad, lerp,
};
use super::fused::{self, affine, Elem, MAX_BUFFERS};
use super::{Buffers, OptimizerSpec, Result, UpdateRule};

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const MAX_EXP_AVG_SQ: &str = "max_exp_avg_sq";

/// `torch.optim.Adam` hyper-parameters; defaults are PyTorch's (no weight decay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
        }
    }
}

/// `torch.optim.AdamW` hyper-parameters; defaults are PyTorch's (weight decay 0.01).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
        }
    }
}

/// The hyper-parameters both variants share, and whether the decay is decoupled.
struct AdamRule {
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    amsgrad: bool,
    decoupled: bool,
}

impl AdamRule {
    fn validate(&self, model: &str, lr: f64) -> Result<()> {
        check_positive(model, "lr", lr)?;
        check_betas(model, self.betas)?;
        check_positive(model, "eps", self.eps)?;
        check_non_negative(model, "weight_decay", self.weight_decay)
    }

    fn buffer_names(&self) -> Vec<&'static str> {
        let mut names = vec![EXP_AVG, EXP_AVG_SQ];
        if self.amsgrad {
            names.push(MAX_EXP_AVG_SQ);
        }
        names
    }

    fn update(
        &self,
        lr: f64,
        step: u64,
        param: &Tensor,
        grad: &Tensor,
        buffers: &mut Buffers,
    ) -> candle_core::Result<Tensor> {
        let (beta1, beta2) = self.betas;
        let (param, grad) = if self.decoupled {
            let param = if self.weight_decay != 0.0 {
                param.affine(1.0 - lr * self.weight_decay, 0.0)?
            } else {
                param.clone()
            };
            (param, grad.clone())
        } else {
            (param.clone(), l2_grad(grad, param, self.weight_decay)?)
        };
        // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let exp_avg = lerp(
            &buffer_or_zeros(buffers, EXP_AVG, &param)?,
            &grad,
            1.0 - beta1,
        )?;
        let exp_avg_sq = buffer_or_zeros(buffers, EXP_AVG_SQ, &param)?;
        let exp_avg_sq =
            (exp_avg_sq.affine(beta2, 0.0)? + grad.affine(1.0 - beta2, 0.0)?.mul(&grad)?)?;
        buffers.insert(EXP_AVG, exp_avg.clone());
        buffers.insert(EXP_AVG_SQ, exp_avg_sq.clone());

        let step = step as f64;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(0.5);
        let second = if self.amsgrad {
            let max_sq = buffer_or_zeros(buffers, MAX_EXP_AVG_SQ, &param)?.maximum(&exp_avg_sq)?;
            buffers.insert(MAX_EXP_AVG_SQ, max_sq.clone());
            max_sq
        } else {
            exp_avg_sq
        };
        // denom = (second.sqrt() / bias_correction2_sqrt).add_(eps); candle has no division
        // by a scalar, so this multiplies by the reciprocal (at most one ulp apart).
        let denom = second
            .sqrt()?
            .affine(1.0 / bias_correction2_sqrt, 0.0)?
            .affine(1.0, self.eps)?;
        // param.addcdiv_(exp_avg, denom, value=-step_size)
        &param + exp_avg.affine(-step_size, 0.0)?.div(&denom)?
    }
}

/// Adam's and AdamW's per-element constants for one step (in f64; each kernel converts them to
/// its element type): what the CPU closure and the CUDA kernel (`optim_adam_*` in
/// `src/kernels/cuda/optim.cu`, which declares the same layout) both compute from.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamArgs {
    /// The parameter's factor `1 - lr * weight_decay` (decoupled) or the gradient's L2 term's
    /// `weight_decay`.
    pub decay: f64,
    /// The lerp weight of `exp_avg` (1 - beta1) and one minus it.
    pub wt: f64,
    pub one_minus_wt: f64,
    pub beta2: f64,
    pub one_minus_beta2: f64,
    /// 1 / sqrt(1 - beta2^step).
    pub inv_bc2: f64,
    pub eps: f64,
    /// -lr / (1 - beta1^step).
    pub neg_step: f64,
    /// [`AdamArgs::DECAY`] | [`AdamArgs::DECOUPLED`] | [`AdamArgs::LERP_SMALL`] |
    /// [`AdamArgs::AMSGRAD`].
    pub flags: u32,
    pub pad: u32,
}

impl AdamArgs {
    pub const DECAY: u32 = 1;
    pub const DECOUPLED: u32 = 2;
    /// The lerp's weight is below 0.5 in magnitude (which of its two forms it takes).
    pub const LERP_SMALL: u32 = 4;
    pub const AMSGRAD: u32 = 8;

    fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

impl AdamRule {
    /// The per-element constants of step `step` at learning rate `lr`.
    fn args(&self, lr: f64, step: u64) -> AdamArgs {
        let (beta1, beta2) = self.betas;
        let w = 1.0 - beta1;
        let step = step as f64;
        let step_size = lr / (1.0 - beta1.powf(step));
        let bias_correction2_sqrt = (1.0 - beta2.powf(step)).powf(0.5);
        let flag = |on: bool, f: u32| if on { f } else { 0 };
        AdamArgs {
            decay: if self.decoupled {
                1.0 - lr * self.weight_decay
            } else {
                self.weight_decay
            },
            wt: w,
            one_minus_wt: 1.0 - w,
            beta2,
            one_minus_beta2: 1.0 - beta2,
            inv_bc2: 1.0 / bias_correction2_sqrt,
            eps: self.eps,
            neg_step: -step_size,
            flags: flag(self.weight_decay != 0.0, AdamArgs::DECAY)
                | flag(self.decoupled, AdamArgs::DECOUPLED)
                | flag(w.abs() < 0.5, AdamArgs::LERP_SMALL)
                | flag(self.amsgrad, AdamArgs::AMSGRAD),
            pad: 0,
        }
    }

    /// `update` for one element: (param, grad, [exp_avg, exp_avg_sq, max_exp_avg_sq?]) -> new
    /// param, the buffers updated in place; the same operations in the same order.
    fn kernel<T: Elem>(a: AdamArgs) -> impl Fn(T, T, &mut [T; MAX_BUFFERS]) -> T + Sync {
        let c = |v: f64| T::from_f64(v);
        let zero = T::zero();
        let decay = a.has(AdamArgs::DECAY).then(|| c(a.decay));
        let decoupled = a.has(AdamArgs::DECOUPLED);
        let small = a.has(AdamArgs::LERP_SMALL);
        let (wt, one_minus_wt) = (c(a.wt), c(a.one_minus_wt));
        let (beta2, one_minus_beta2) = (c(a.beta2), c(a.one_minus_beta2));
        let (inv_bc2, one, eps, neg_step) = (c(a.inv_bc2), c(1.0), c(a.eps), c(a.neg_step));
        let amsgrad = a.has(AdamArgs::AMSGRAD);
        move |p: T, g: T, b: &mut [T; MAX_BUFFERS]| {
            let (p, g) = match decay {
                Some(d) if decoupled => (affine(p, d, zero), g),
                Some(d) => (p, g + affine(p, d, zero)),
                None => (p, g),
            };
            b[0] = fused::lerp(b[0], g, small, wt, one_minus_wt);
            b[1] = affine(b[1], beta2, zero) + affine(g, one_minus_beta2, zero) * g;
            let second = if amsgrad {
                // candle's maximum: if a < b { b } else { a }
                if b[2] < b[1] {
                    b[2] = b[1];
                }
                b[2]
            } else {
                b[1]
            };
            let denom = affine(affine(second.sqrt(), inv_bc2, zero), one, eps);
            p + affine(b[0], neg_step, zero) / denom
        }
    }
}

impl AdamConfig {
    fn rule(&self) -> AdamRule {
        AdamRule {
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
            amsgrad: self.amsgrad,
            decoupled: false,
        }
    }
}

impl AdamWConfig {
    fn rule(&self) -> AdamRule {
        AdamRule {
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
            amsgrad: self.amsgrad,
            decoupled: true,
        }
    }
}

macro_rules! impl_adam_rule {
    ($config:ty, $variant:ident) => {
        impl UpdateRule for $config {
            fn validate(&self, model: &str) -> Result<()> {
                self.rule().validate(model, self.lr)
            }

            fn initial_lr(&self) -> f64 {
                self.lr
            }

            fn to_spec(&self) -> OptimizerSpec {
                OptimizerSpec::$variant(self.clone())
            }

            fn from_spec(spec: &OptimizerSpec) -> Option<Self> {
                match spec {
                    OptimizerSpec::$variant(c) => Some(c.clone()),
                    _ => None,
                }
            }

            fn buffer_names(&self) -> Vec<&'static str> {
                self.rule().buffer_names()
            }

            fn update_fused(
                &self,
                lr: f64,
                step: u64,
                var: &Var,
                grad: &Tensor,
                scale: Option<f64>,
                buffers: &mut Buffers,
            ) -> candle_core::Result<bool> {
                let rule = self.rule();
                let args = rule.args(lr, step);
                fused::update(
                    var,
                    grad,
                    scale,
                    &rule.buffer_names(),
                    buffers,
                    fused::Rule::Adam(args),
                    AdamRule::kernel::<f32>(args),
                    AdamRule::kernel::<f64>(args),
                )
            }

            fn update(
                &self,
                lr: f64,
                step: u64,
                param: &Tensor,
                grad: &Tensor,
                buffers: &mut Buffers,
            ) -> candle_core::Result<Tensor> {
                self.rule().update(lr, step, param, grad, buffers)
            }
        }
    };
}

impl_adam_rule!(AdamConfig, Adam);
impl_adam_rule!(AdamWConfig, AdamW);
