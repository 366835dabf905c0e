//! Ports `BezierActivation`, `BezierActivationModule` and `TrainableBezier` from
//! fluxflow-core's `models/activations.py`.

use candle_core::{Result, Tensor};

pub use crate::kernels::bezier::PreAct;
use crate::params::{Init, Pb};

/// The cubic Bezier curve `(1-t)^3 p0 + 3(1-t)^2 t p1 + 3(1-t) t^2 p2 + t^3 p3`, evaluated in the
/// reference's operation order. All inputs broadcast against `t`.
pub fn curve(t: &Tensor, p0: &Tensor, p1: &Tensor, p2: &Tensor, p3: &Tensor) -> Result<Tensor> {
    let t2 = t.sqr()?;
    let t3 = (&t2 * t)?;
    let ti = t.affine(-1.0, 1.0)?;
    let ti2 = ti.sqr()?;
    let ti3 = (&ti2 * &ti)?;
    let out = ti3
        .broadcast_mul(p0)?
        .add(&(&ti2 * t)?.broadcast_mul(&(p1 * 3.0)?)?)?;
    let out = out.add(&(&ti * &t2)?.broadcast_mul(&(p2 * 3.0)?)?)?;
    out.add(&t3.broadcast_mul(p3)?)
}

/// BezierActivation: reads groups of 5 consecutive channels `[t, p0, p1, p2, p3]` (dim 1 of a
/// 4-D or larger tensor, the last axis of a 2-D or 3-D one) and returns one channel per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BezierActivation {
    pub t_pre: PreAct,
    pub p_pre: PreAct,
}

impl BezierActivation {
    /// The VAE's choice: sigmoid on t, SiLU on the control points.
    pub const VAE: Self = Self::new(PreAct::Sigmoid, PreAct::Silu);
    /// The reference's default (flow blocks, text projection): sigmoid on t, nothing on p.
    pub const DEFAULT: Self = Self::new(PreAct::Sigmoid, PreAct::None);

    pub const fn new(t_pre: PreAct, p_pre: PreAct) -> Self {
        Self { t_pre, p_pre }
    }

    /// The grouped axis of `dims`.
    fn axis(dims: &[usize]) -> Result<usize> {
        let axis = match dims.len() {
            2 | 3 => dims.len() - 1,
            n if n >= 4 => 1,
            n => candle_core::bail!("Bezier activation: unsupported rank {n} of {dims:?}"),
        };
        if !dims[axis].is_multiple_of(5) {
            candle_core::bail!("Bezier activation: axis {axis} of {dims:?} is not divisible by 5");
        }
        Ok(axis)
    }

    /// [B, 5F] -> [B, F]; [B, S, 5F] -> [B, S, F]; [B, 5F, H, W, ...] -> [B, F, H, W, ...]
    ///
    /// One fused op (`kernels::bezier`) where the dtype and device allow, else
    /// [`Self::forward_composite`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !crate::kernels::bezier::supported(x) {
            return self.forward_composite(x);
        }
        let dims = x.dims().to_vec();
        let axis = Self::axis(&dims)?;
        let mut out = dims.clone();
        out[axis] /= 5;
        // Channel c = 5f + i: grouped as [.., F, 5, S] with S the positions after the axis.
        let s: usize = dims[axis + 1..].iter().product();
        crate::kernels::bezier::bezier(x, self.t_pre, self.p_pre, s.max(1), out.into())
    }

    /// The activation as a composition of candle ops (each keeps its inputs for the backward
    /// pass): the definition the fused op is tested against.
    pub fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let axis = Self::axis(&dims)?;
        // Split the grouped axis into (F, 5) and take the five parts along the new axis.
        let mut grouped = dims.clone();
        grouped[axis] = dims[axis] / 5;
        let part_axis = if axis == 1 && dims.len() >= 4 {
            2
        } else {
            axis + 1
        };
        grouped.insert(part_axis, 5);
        let xg = x.reshape(grouped)?;
        let part = |i: usize| -> Result<Tensor> { xg.narrow(part_axis, i, 1)?.squeeze(part_axis) };
        let t = self.t_pre.apply(&part(0)?)?;
        let p: Vec<Tensor> = (1..5)
            .map(|i| self.p_pre.apply(&part(i)?))
            .collect::<Result<_>>()?;
        curve(&t, &p[0], &p[1], &p[2], &p[3])
    }
}

/// TrainableBezier: `t = sigmoid(x)` with learned control points p0..p3.
#[derive(Debug, Clone)]
pub struct TrainableBezier {
    p: [Tensor; 4],
    channel_only: bool,
}

impl TrainableBezier {
    /// Control points of `shape` initialised to `init` (the reference's p0..p3 arguments).
    /// `channel_only` with a 1-D shape broadcasts them as (1, C, 1, 1) over 4-D inputs.
    pub fn new(shape: &[usize], init: [f64; 4], channel_only: bool, pb: Pb) -> Result<Self> {
        let get = |i: usize| pb.get(&format!("p{i}"), shape, Init::Const(init[i]));
        Ok(Self {
            p: [get(0)?, get(1)?, get(2)?, get(3)?],
            channel_only: channel_only && shape.len() == 1,
        })
    }

    /// The reference's default control points (1e-8, 0.25, 0.75, 1).
    pub const DEFAULT_INIT: [f64; 4] = [1e-8, 0.25, 0.75, 1.0];

    /// Same shape in and out.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p: Vec<Tensor> = self
            .p
            .iter()
            .map(|p| crate::nn::cast_like(p, x))
            .collect::<Result<_>>()?;
        let ps: Vec<Tensor> = if self.channel_only && x.rank() == 4 {
            p.iter()
                .map(|p| p.reshape((1, (), 1, 1)))
                .collect::<Result<_>>()?
        } else {
            // expand_as: right-aligned broadcast to x's shape.
            p.iter()
                .map(|p| p.broadcast_as(x.shape()))
                .collect::<Result<_>>()?
        };
        let t = candle_nn::ops::sigmoid(x)?;
        curve(&t, &ps[0], &ps[1], &ps[2], &ps[3])
    }
}
