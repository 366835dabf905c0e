//! Hyper-parameter checks and the tensor expressions several optimizers share.

use candle_core::Tensor;

use super::{Buffers, OptimError, Result};

/// `Err` naming `model` and `field` unless `ok`.
pub(super) fn check(
    model: &str,
    field: &'static str,
    value: f64,
    ok: bool,
    expected: &'static str,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(OptimError::InvalidHyperParameter {
            model: model.to_string(),
            field,
            expected,
            value,
        })
    }
}

// The comparisons below are written so that NaN fails them.

pub(super) fn check_positive(model: &str, field: &'static str, value: f64) -> Result<()> {
    check(model, field, value, value > 0.0 && value.is_finite(), "> 0")
}

pub(super) fn check_non_negative(model: &str, field: &'static str, value: f64) -> Result<()> {
    check(
        model,
        field,
        value,
        value >= 0.0 && value.is_finite(),
        ">= 0",
    )
}

/// In [0, 1): momentum and betas.
pub(super) fn check_unit_half_open(model: &str, field: &'static str, value: f64) -> Result<()> {
    check(
        model,
        field,
        value,
        (0.0..1.0).contains(&value),
        "in [0, 1)",
    )
}

pub(super) fn check_betas(model: &str, betas: (f64, f64)) -> Result<()> {
    check_unit_half_open(model, "betas[0]", betas.0)?;
    check_unit_half_open(model, "betas[1]", betas.1)
}

/// The buffer `name`, zeros like `like` when the parameter has none yet (PyTorch's lazy init).
pub(super) fn buffer_or_zeros(
    buffers: &Buffers,
    name: &str,
    like: &Tensor,
) -> candle_core::Result<Tensor> {
    match buffers.get(name) {
        Some(t) => Ok(t.clone()),
        None => like.zeros_like(),
    }
}

/// `torch.lerp(start, end, weight)` as its CPU kernel computes it: `start + w*(end-start)` for
/// |w| < 0.5, else `end - (end-start)*(1-w)`.
pub(super) fn lerp(start: &Tensor, end: &Tensor, weight: f64) -> candle_core::Result<Tensor> {
    let diff = (end - start)?;
    if weight.abs() < 0.5 {
        start + diff.affine(weight, 0.0)?
    } else {
        end - diff.affine(1.0 - weight, 0.0)?
    }
}

/// `grad.add(param, alpha=weight_decay)`: the L2 penalty folded into the gradient.
pub(super) fn l2_grad(
    grad: &Tensor,
    param: &Tensor,
    weight_decay: f64,
) -> candle_core::Result<Tensor> {
    if weight_decay != 0.0 {
        grad + param.affine(weight_decay, 0.0)?
    } else {
        Ok(grad.clone())
    }
}
