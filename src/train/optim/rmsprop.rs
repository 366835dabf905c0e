//! RMSprop as `torch.optim.RMSprop` (single-tensor path, `foreach=False`).

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::common::{
    buffer_or_zeros, check, check_non_negative, check_positive, check_unit_half_open, l2_grad, lerp,
};
use super::fused::{self, affine, Elem, MAX_BUFFERS};
use super::{Buffers, OptimizerSpec, Result, UpdateRule};

const SQUARE_AVG: &str = "square_avg";
const GRAD_AVG: &str = "grad_avg";
const MOMENTUM_BUFFER: &str = "momentum_buffer";

/// `torch.optim.RMSprop` hyper-parameters; defaults are PyTorch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmsPropConfig {
    pub lr: f64,
    pub alpha: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub centered: bool,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: false,
        }
    }
}

impl UpdateRule for RmsPropConfig {
    fn validate(&self, model: &str) -> Result<()> {
        check_positive(model, "lr", self.lr)?;
        let alpha_ok = self.alpha > 0.0 && self.alpha <= 1.0;
        check(model, "alpha", self.alpha, alpha_ok, "in (0, 1]")?;
        check_positive(model, "eps", self.eps)?;
        check_non_negative(model, "weight_decay", self.weight_decay)?;
        check_unit_half_open(model, "momentum", self.momentum)
    }

    fn initial_lr(&self) -> f64 {
        self.lr
    }

    fn to_spec(&self) -> OptimizerSpec {
        OptimizerSpec::RmsProp(self.clone())
    }

    fn from_spec(spec: &OptimizerSpec) -> Option<Self> {
        match spec {
            OptimizerSpec::RmsProp(c) => Some(c.clone()),
            _ => None,
        }
    }

    fn buffer_names(&self) -> Vec<&'static str> {
        let mut names = vec![SQUARE_AVG];
        if self.momentum > 0.0 {
            names.push(MOMENTUM_BUFFER);
        }
        if self.centered {
            names.push(GRAD_AVG);
        }
        names
    }

    fn update_fused(
        &self,
        lr: f64,
        _step: u64,
        var: &Var,
        grad: &Tensor,
        scale: Option<f64>,
        buffers: &mut Buffers,
    ) -> candle_core::Result<bool> {
        let args = self.args(lr);
        fused::update(
            var,
            grad,
            scale,
            &self.buffer_names(),
            buffers,
            fused::Rule::RmsProp(args),
            Self::kernel::<f32>(args),
            Self::kernel::<f64>(args),
        )
    }

    fn update(
        &self,
        lr: f64,
        _step: u64,
        param: &Tensor,
        grad: &Tensor,
        buffers: &mut Buffers,
    ) -> candle_core::Result<Tensor> {
        let alpha = self.alpha;
        let grad = l2_grad(grad, param, self.weight_decay)?;
        // square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        let square_avg = buffer_or_zeros(buffers, SQUARE_AVG, param)?;
        let square_avg =
            (square_avg.affine(alpha, 0.0)? + grad.affine(1.0 - alpha, 0.0)?.mul(&grad)?)?;
        buffers.insert(SQUARE_AVG, square_avg.clone());
        let avg = if self.centered {
            // grad_avg.lerp_(grad, 1 - alpha); square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
            let grad_avg = buffer_or_zeros(buffers, GRAD_AVG, param)?;
            let grad_avg = lerp(&grad_avg, &grad, 1.0 - alpha)?;
            buffers.insert(GRAD_AVG, grad_avg.clone());
            (square_avg - grad_avg.sqr()?)?.sqrt()?
        } else {
            square_avg.sqrt()?
        };
        let avg = avg.affine(1.0, self.eps)?;
        if self.momentum > 0.0 {
            // buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
            let buf = buffer_or_zeros(buffers, MOMENTUM_BUFFER, param)?;
            let buf = (buf.affine(self.momentum, 0.0)? + grad.div(&avg)?)?;
            buffers.insert(MOMENTUM_BUFFER, buf.clone());
            param + buf.affine(-lr, 0.0)?
        } else {
            // param.addcdiv_(grad, avg, value=-lr)
            param + grad.affine(-lr, 0.0)?.div(&avg)?
        }
    }
}

/// RMSprop's per-element constants for one step (in f64; each kernel converts them to its element
/// type): what the CPU closure and the CUDA kernel (`optim_rmsprop_*` in
/// `src/kernels/cuda/optim.cu`, which declares the same layout) both compute from.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsPropArgs {
    pub alpha: f64,
    pub one_minus_alpha: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    /// The lerp weight of `grad_avg` (1 - alpha) and one minus it.
    pub wt: f64,
    pub one_minus_wt: f64,
    pub eps: f64,
    pub neg_lr: f64,
    /// [`RmsPropArgs::WEIGHT_DECAY`] | [`RmsPropArgs::MOMENTUM`] | [`RmsPropArgs::CENTERED`] |
    /// [`RmsPropArgs::LERP_SMALL`].
    pub flags: u32,
    pub pad: u32,
}

impl RmsPropArgs {
    pub const WEIGHT_DECAY: u32 = 1;
    pub const MOMENTUM: u32 = 2;
    pub const CENTERED: u32 = 4;
    /// The lerp's weight is below 0.5 in magnitude (which of its two forms it takes).
    pub const LERP_SMALL: u32 = 8;

    fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

impl RmsPropConfig {
    /// The per-element constants of a step at learning rate `lr`.
    pub(super) fn args(&self, lr: f64) -> RmsPropArgs {
        let w = 1.0 - self.alpha;
        let flag = |on: bool, f: u32| if on { f } else { 0 };
        RmsPropArgs {
            alpha: self.alpha,
            one_minus_alpha: 1.0 - self.alpha,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            wt: w,
            one_minus_wt: 1.0 - w,
            eps: self.eps,
            neg_lr: -lr,
            flags: flag(self.weight_decay != 0.0, RmsPropArgs::WEIGHT_DECAY)
                | flag(self.momentum > 0.0, RmsPropArgs::MOMENTUM)
                | flag(self.centered, RmsPropArgs::CENTERED)
                | flag(w.abs() < 0.5, RmsPropArgs::LERP_SMALL),
            pad: 0,
        }
    }

    /// `update` for one element: (param, grad, [square_avg, momentum_buffer?, grad_avg?]) ->
    /// new param, the buffers updated in place; the same operations in the same order.
    fn kernel<T: Elem>(a: RmsPropArgs) -> impl Fn(T, T, &mut [T; MAX_BUFFERS]) -> T + Sync {
        let c = |v: f64| T::from_f64(v);
        let zero = T::zero();
        let (alpha, one_minus_alpha) = (c(a.alpha), c(a.one_minus_alpha));
        let weight_decay = a.has(RmsPropArgs::WEIGHT_DECAY).then(|| c(a.weight_decay));
        let momentum = a.has(RmsPropArgs::MOMENTUM).then(|| (1, c(a.momentum)));
        let grad_avg = a
            .has(RmsPropArgs::CENTERED)
            .then(|| 1 + usize::from(momentum.is_some()));
        let small = a.has(RmsPropArgs::LERP_SMALL);
        let (wt, one_minus_wt) = (c(a.wt), c(a.one_minus_wt));
        let (one, eps, neg_lr) = (c(1.0), c(a.eps), c(a.neg_lr));
        move |p: T, g: T, b: &mut [T; MAX_BUFFERS]| {
            let g = match weight_decay {
                Some(wd) => g + affine(p, wd, zero),
                None => g,
            };
            b[0] = affine(b[0], alpha, zero) + affine(g, one_minus_alpha, zero) * g;
            let avg = match grad_avg {
                Some(k) => {
                    b[k] = fused::lerp(b[k], g, small, wt, one_minus_wt);
                    (b[0] - b[k] * b[k]).sqrt()
                }
                None => b[0].sqrt(),
            };
            let avg = affine(avg, one, eps);
            match momentum {
                Some((k, m)) => {
                    b[k] = affine(b[k], m, zero) + g / avg;
                    p + affine(b[k], neg_lr, zero)
                }
                None => p + affine(g, neg_lr, zero) / avg,
            }
        }
    }
}
