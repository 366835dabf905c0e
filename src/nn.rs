//! Differentiable building blocks with PyTorch semantics (torch.nn's Linear, Conv2d,
//! ConvTranspose2d, LayerNorm, GroupNorm, MultiheadAttention, Embedding, bilinear resize).
//!
//! candle's fused layer_norm, softmax_last_dim and upsample_bilinear2d have no backward, so
//! everything here is composed of ops that do.

use candle_core::{DType, Device, Module, Result, Tensor, D};

use crate::kernels::in_f32;
use crate::params::{Init, Pb};

/// Which initialisation a layer gets when it is created fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    /// PyTorch's default: kaiming_uniform(a=sqrt(5)) weights and U(+-1/sqrt(fan_in)) bias.
    Torch,
    /// The reference's `xavier_init`: xavier_uniform weights, zero bias.
    Xavier,
}

/// A parameter in the dtype of the activation it meets. Mixed precision keeps float32 master
/// weights and computes in bfloat16: the cast's backward pass casts the gradient back, so the
/// float32 variable receives it. A no-op when the dtypes agree.
pub fn cast_like(param: &Tensor, x: &Tensor) -> Result<Tensor> {
    if param.dtype() == x.dtype() {
        Ok(param.clone())
    } else {
        param.to_dtype(x.dtype())
    }
}

fn weight_init(kind: InitKind, fan_in: usize, fan_out: usize) -> Init {
    match kind {
        InitKind::Torch => Init::Uniform(1.0 / (fan_in as f64).sqrt()),
        InitKind::Xavier => Init::Uniform((6.0 / (fan_in + fan_out) as f64).sqrt()),
    }
}

fn bias_init(kind: InitKind, fan_in: usize) -> Init {
    match kind {
        InitKind::Torch => Init::Uniform(1.0 / (fan_in as f64).sqrt()),
        InitKind::Xavier => Init::Const(0.0),
    }
}

/// torch.nn.Linear: `x @ W^T + b` over the last axis.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, kind: InitKind, pb: Pb) -> Result<Self> {
        let weight = pb.get(
            "weight",
            &[out_dim, in_dim],
            weight_init(kind, in_dim, out_dim),
        )?;
        let bias = Some(pb.get("bias", &[out_dim], bias_init(kind, in_dim))?);
        Ok(Self { weight, bias })
    }

    /// A layer from explicit tensors (for packed projections such as MultiheadAttention's).
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

impl Module for Linear {
    /// [..., in] -> [..., out]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x
            .reshape((rows, in_dim))?
            .matmul(&cast_like(&self.weight, x)?.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&cast_like(b, x)?)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// Geometry of a 2-D convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvCfg {
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
}

impl ConvCfg {
    pub const fn pad(padding: usize) -> Self {
        Self {
            padding,
            stride: 1,
            dilation: 1,
        }
    }
}

/// torch.nn.Conv2d (groups = 1).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: ConvCfg,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        cfg: ConvCfg,
        bias: bool,
        kind: InitKind,
        pb: Pb,
    ) -> Result<Self> {
        let (fan_in, fan_out) = (in_c * k * k, out_c * k * k);
        let weight = pb.get(
            "weight",
            &[out_c, in_c, k, k],
            weight_init(kind, fan_in, fan_out),
        )?;
        let bias = if bias {
            Some(pb.get("bias", &[out_c], bias_init(kind, fan_in))?)
        } else {
            None
        };
        Ok(Self { weight, bias, cfg })
    }
}

impl Module for Conv2d {
    /// [B, in, H, W] -> [B, out, H', W']
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = crate::kernels::conv2d(
            x,
            &cast_like(&self.weight, x)?,
            self.cfg.padding,
            self.cfg.stride,
            self.cfg.dilation,
        )?;
        match &self.bias {
            Some(b) => y.broadcast_add(&cast_like(b, x)?.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// torch.nn.ConvTranspose2d (groups = 1, dilation = 1, output_padding = 0). Weight [in, out, k, k].
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl ConvTranspose2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
        kind: InitKind,
        pb: Pb,
    ) -> Result<Self> {
        // PyTorch takes fan_in from the weight's dim 1, which is out_c for a transposed conv.
        let (fan_in, fan_out) = (out_c * k * k, in_c * k * k);
        let weight = pb.get(
            "weight",
            &[in_c, out_c, k, k],
            weight_init(kind, fan_in, fan_out),
        )?;
        let bias = pb.get("bias", &[out_c], bias_init(kind, fan_in))?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }
}

impl Module for ConvTranspose2d {
    /// [B, in, H, W] -> [B, out, (H-1)s - 2p + k, ...]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = cast_like(&self.weight, x)?;
        let y = crate::kernels::conv_transpose2d(x, &w, self.padding, 0, self.stride, 1)?;
        y.broadcast_add(&cast_like(&self.bias, x)?.reshape((1, (), 1, 1))?)
    }
}

/// torch.nn.LayerNorm over the last axis (biased variance, eps 1e-5), differentiable.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, pb: Pb) -> Result<Self> {
        Ok(Self {
            weight: pb.get("weight", &[dim], Init::Const(1.0))?,
            bias: pb.get("bias", &[dim], Init::Const(0.0))?,
            eps: 1e-5,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xn = in_f32(x, |x| normalize_last(x, self.eps))?;
        xn.broadcast_mul(&cast_like(&self.weight, x)?)?
            .broadcast_add(&cast_like(&self.bias, x)?)
    }
}

/// (x - mean) / sqrt(var + eps) over the last axis, biased variance.
fn normalize_last(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// torch.nn.GroupNorm (eps 1e-5), with or without the per-channel affine transform.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    groups: usize,
    affine: Option<(Tensor, Tensor)>,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, affine: bool, pb: Pb) -> Result<Self> {
        let affine = if affine {
            Some((
                pb.get("weight", &[channels], Init::Const(1.0))?,
                pb.get("bias", &[channels], Init::Const(0.0))?,
            ))
        } else {
            None
        };
        Ok(Self {
            groups,
            affine,
            eps: 1e-5,
        })
    }
}

impl Module for GroupNorm {
    /// [B, C, H, W] -> [B, C, H, W]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if crate::kernels::group_norm::supported(x) {
            // One fused op (statistics in float32 for 16-bit inputs, float64 for f64).
            let (gamma, beta) = match &self.affine {
                Some((wt, bs)) => (cast_like(wt, x)?, cast_like(bs, x)?),
                None => (
                    Tensor::ones(c, x.dtype(), x.device())?,
                    Tensor::zeros(c, x.dtype(), x.device())?,
                ),
            };
            return crate::kernels::group_norm::group_norm(x, self.groups, &gamma, &beta, self.eps);
        }
        let grouped = x.reshape((b, self.groups, (c / self.groups) * h * w))?;
        let xn = in_f32(&grouped, |g| normalize_last(g, self.eps))?.reshape((b, c, h, w))?;
        match &self.affine {
            Some((wt, bs)) => xn
                .broadcast_mul(&cast_like(wt, x)?.reshape((1, c, 1, 1))?)?
                .broadcast_add(&cast_like(bs, x)?.reshape((1, c, 1, 1))?),
            None => Ok(xn),
        }
    }
}

/// torch.nn.Embedding (weights N(0, 1)).
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    pub fn new(n: usize, dim: usize, pb: Pb) -> Result<Self> {
        Ok(Self {
            weight: pb.get("weight", &[n, dim], Init::Normal(1.0))?,
        })
    }

    /// ids [B] (u32) -> [B, dim]
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.index_select(ids, 0)
    }
}

/// Score-matrix elements one chunk of queries may hold (2^24: 64 MB in f32).
const ATTENTION_BUDGET: usize = 1 << 24;

/// softmax(q k^T * scale) v for [B, H, S, Dh] inputs, in chunks of queries whose score matrices
/// hold at most [`ATTENTION_BUDGET`] elements, with or without gradients: memory grows linearly
/// with the tokens (`kernels::attention`; the backward pass recomputes each chunk's scores).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    crate::kernels::attention::attention(q, k, v, scale, ATTENTION_BUDGET)
}

/// [B, S, H*Dh] -> [B, H, S, Dh]
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, d) = x.dims3()?;
    x.reshape((b, s, heads, d / heads))?.transpose(1, 2)
}

/// [B, H, S, Dh] -> [B, S, H*Dh]
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, dh) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, s, h * dh))
}

/// torch.nn.MultiheadAttention (batch_first, packed in_proj, self-attention use only).
#[derive(Debug, Clone)]
pub struct MultiheadAttention {
    in_proj: Linear,
    out_proj: Linear,
    heads: usize,
    dim: usize,
}

impl MultiheadAttention {
    pub fn new(dim: usize, heads: usize, pb: Pb) -> Result<Self> {
        // _reset_parameters: xavier_uniform in_proj_weight, zero biases; out_proj keeps
        // Linear's default weight.
        let w = pb.get(
            "in_proj_weight",
            &[3 * dim, dim],
            weight_init(InitKind::Xavier, dim, 3 * dim),
        )?;
        let b = pb.get("in_proj_bias", &[3 * dim], Init::Const(0.0))?;
        let op = pb.pp("out_proj");
        let out_w = op.get(
            "weight",
            &[dim, dim],
            weight_init(InitKind::Torch, dim, dim),
        )?;
        let out_b = op.get("bias", &[dim], Init::Const(0.0))?;
        Ok(Self {
            in_proj: Linear::from_tensors(w, Some(b)),
            out_proj: Linear::from_tensors(out_w, Some(out_b)),
            heads,
            dim,
        })
    }

    /// [B, S, D] -> [B, S, D]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.in_proj.forward(x)?;
        let d = self.dim;
        let q = split_heads(&qkv.narrow(D::Minus1, 0, d)?, self.heads)?;
        let k = split_heads(&qkv.narrow(D::Minus1, d, d)?, self.heads)?;
        let v = split_heads(&qkv.narrow(D::Minus1, 2 * d, d)?, self.heads)?;
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let out = attention(&q, &k, &v, scale)?;
        self.out_proj.forward(&merge_heads(&out)?)
    }
}

/// Nearest-neighbour 2x upsampling, [B, C, H, W] -> [B, C, 2H, 2W], through a broadcast so
/// the gradient accumulates (candle 0.11's `upsample_nearest2d` backward overwrites the
/// gradient already accumulated for its input instead of adding to it).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}

/// The [out, in] matrix of 1-D linear interpolation with align_corners=False (PyTorch's rule:
/// src = (dst + 0.5) * in/out - 0.5, clamped at 0).
fn bilinear_matrix(out_len: usize, in_len: usize) -> Vec<f64> {
    let mut m = vec![0.0; out_len * in_len];
    let scale = in_len as f64 / out_len as f64;
    for o in 0..out_len {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(in_len - 1);
        let i1 = (i0 + 1).min(in_len - 1);
        let l1 = src - i0 as f64;
        m[o * in_len + i0] += 1.0 - l1;
        m[o * in_len + i1] += l1;
    }
    m
}

/// F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False) as two matmuls, so the
/// gradient reaches x. [B, C, Hi, Wi] -> [B, C, h, w]
pub fn resize_bilinear(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, c, hi, wi) = x.dims4()?;
    let dev = x.device();
    let dt = x.dtype();
    let mw = interp_t(w, wi, dt, dev)?; // [Wi, w]
    let mh = interp_t(h, hi, dt, dev)?; // [Hi, h]
    let y = x.reshape((b * c * hi, wi))?.matmul(&mw)?; // [B*C*Hi, w]
    let y = y.reshape((b, c, hi, w))?.transpose(2, 3)?.contiguous()?; // [B, C, w, Hi]
    let y = y.reshape((b * c * w, hi))?.matmul(&mh)?; // [B*C*w, h]
    y.reshape((b, c, w, h))?.transpose(2, 3)?.contiguous()
}

fn interp_t(out_len: usize, in_len: usize, dt: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(
        bilinear_matrix(out_len, in_len),
        (out_len, in_len),
        &Device::Cpu,
    )?
    .t()?
    .contiguous()?
    .to_dtype(dt)?
    .to_device(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_upsampling_accumulates_gradients_from_every_use() {
        let x = candle_core::Var::new(&[[[[1f64, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let up = upsample_nearest2x(x.as_tensor()).unwrap();
        assert_eq!(up.dims(), &[1, 1, 4, 4]);
        let row: Vec<f64> = up
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(row, vec![1., 1., 2., 2.]);
        // x used twice: once directly, once upsampled (4 copies of each element).
        let loss = (x.as_tensor().sum_all().unwrap() + up.sum_all().unwrap()).unwrap();
        let g = loss.backward().unwrap();
        let g: Vec<f64> = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g, vec![5.0; 4]);
    }

    #[test]
    fn bilinear_rows_sum_to_one_and_match_pytorch_doubling() {
        let m = bilinear_matrix(4, 2);
        // PyTorch: upsampling [a, b] to 4 gives [a, .75a+.25b, .25a+.75b, b].
        assert_eq!(m, vec![1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0]);
    }
}
