//! Ports `SPADE`, `ContextAttentionMixer` and `GatedContextInjection` from fluxflow-core's
//! `models/conditioning.py`.

use candle_core::{Module, Result, Tensor, D};

use crate::nn::{
    attention, cast_like, merge_heads, resize_bilinear, split_heads, Conv2d, ConvCfg, GroupNorm,
    InitKind, LayerNorm, Linear,
};
use crate::params::{Init, Pb};

/// SPADE: `GroupNorm(x) * (1 + gamma(ctx)) + beta(ctx)`, the context resized bilinearly to x.
#[derive(Debug, Clone)]
pub struct Spade {
    norm: GroupNorm,
    mlp_shared: Conv2d,
    mlp_gamma: Conv2d,
    mlp_beta: Conv2d,
}

impl Spade {
    pub fn new(context_nc: usize, features: usize, pb: Pb) -> Result<Self> {
        let hidden = 128;
        let conv = |i: usize, o: usize, p: Pb| {
            Conv2d::new(i, o, 3, ConvCfg::pad(1), true, InitKind::Torch, p)
        };
        Ok(Self {
            norm: GroupNorm::new(features.min(32), features, false, pb.pp("bn"))?,
            mlp_shared: conv(context_nc, hidden, pb.pp("mlp_shared").pp(0))?,
            mlp_gamma: conv(hidden, features, pb.pp("mlp_gamma"))?,
            mlp_beta: conv(hidden, features, pb.pp("mlp_beta"))?,
        })
    }

    /// x [B, F, H, W], context [B, Cc, Hc, Wc] -> [B, F, H, W]
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let normalized = self.norm.forward(x)?;
        let (_, _, h, w) = x.dims4()?;
        let (_, _, hc, wc) = context.dims4()?;
        let ctx = if (hc, wc) != (h, w) {
            resize_bilinear(context, h, w)?
        } else {
            context.clone()
        };
        let actv = self.mlp_shared.forward(&ctx)?.relu()?;
        let gamma = self.mlp_gamma.forward(&actv)?;
        let beta = self.mlp_beta.forward(&actv)?;
        normalized.mul(&(gamma + 1.0)?)?.add(&beta)
    }
}

/// ContextAttentionMixer: self-attention over context tokens with a CLS token for pooling.
#[derive(Debug, Clone)]
pub struct ContextAttentionMixer {
    cls: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    norm_in: LayerNorm,
    norm_out: LayerNorm,
    heads: usize,
}

impl ContextAttentionMixer {
    pub fn new(d: usize, heads: usize, pb: Pb) -> Result<Self> {
        let lin = |n: &str| Linear::new(d, d, InitKind::Xavier, pb.pp(n));
        Ok(Self {
            cls: pb.get("cls", &[1, 1, d], Init::Const(0.0))?,
            q_proj: lin("q_proj")?,
            k_proj: lin("k_proj")?,
            v_proj: lin("v_proj")?,
            out_proj: lin("out_proj")?,
            norm_in: LayerNorm::new(d, pb.pp("norm_in"))?,
            norm_out: LayerNorm::new(d, pb.pp("norm_out"))?,
            heads,
        })
    }

    /// x [B, K, D] -> (pooled [B, D], tokens [B, K, D])
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, k, d) = x.dims3()?;
        let y = self.norm_in.forward(x)?;
        let cls = cast_like(&self.cls, &y)?.broadcast_as((b, 1, d))?;
        let y = Tensor::cat(&[&cls, &y], 1)?;
        let q = split_heads(&self.q_proj.forward(&y)?, self.heads)?;
        let kk = split_heads(&self.k_proj.forward(&y)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(&y)?, self.heads)?;
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let out = merge_heads(&attention(&q, &kk, &v, scale)?)?;
        let out = self.norm_out.forward(&self.out_proj.forward(&out)?)?;
        Ok((out.narrow(1, 0, 1)?.squeeze(1)?, out.narrow(1, 1, k)?))
    }
}

/// GatedContextInjection: `x * sigmoid(gate(ctx)) + bias(ctx)`.
#[derive(Debug, Clone)]
pub struct GatedContextInjection {
    gate: Linear,
    bias: Linear,
}

impl GatedContextInjection {
    pub fn new(context_dim: usize, target_dim: usize, pb: Pb) -> Result<Self> {
        Ok(Self {
            gate: Linear::new(
                context_dim,
                target_dim,
                InitKind::Torch,
                pb.pp("gate").pp(0),
            )?,
            bias: Linear::new(context_dim, target_dim, InitKind::Torch, pb.pp("bias"))?,
        })
    }

    /// x [B, T, D], context [B, Dc] -> [B, T, D]
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let g = candle_nn::ops::sigmoid(&self.gate.forward(context)?)?.unsqueeze(1)?;
        let b = self.bias.forward(context)?.unsqueeze(1)?;
        x.broadcast_mul(&g)?.broadcast_add(&b)
    }
}

/// Mean over the token axis: [B, T, D] -> [B, D]
pub fn mean_tokens(x: &Tensor) -> Result<Tensor> {
    x.mean(D::Minus2)
}
