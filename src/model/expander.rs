//! Ports `FluxExpander`, `ProgressiveUpscaler` and `ResidualUpsampleBlock` (the VAE decoder)
//! from fluxflow-core's `models/vae.py`.

use candle_core::{Module, Result, Tensor};

use super::activation::Activation;
use super::bezier::TrainableBezier;
use super::compressor::latent_sizes;
use super::conditioning::{ContextAttentionMixer, Spade};
use super::config::ModelConfig;
use super::recompute::Recompute;
use crate::nn::{upsample_nearest2x, Conv2d, ConvCfg, ConvTranspose2d, GroupNorm, InitKind};
use crate::params::Pb;

/// One 2x upsampling stage: SPADE, transposed conv, Bezier, dilated conv, Bezier, plus
/// 0.1 x the nearest-upsampled input.
#[derive(Debug, Clone)]
struct ResidualUpsampleBlock {
    spade: Spade,
    up: ConvTranspose2d,
    conv: Conv2d,
    act: Activation,
}

impl ResidualUpsampleBlock {
    /// `mid`: the width between the two sites (`channels` in the reference).
    fn new(channels: usize, mid: usize, context: usize, act: Activation, pb: Pb) -> Result<Self> {
        let c = channels;
        let conv_cfg = ConvCfg {
            padding: 4,
            stride: 1,
            dilation: 2,
        };
        Ok(Self {
            spade: Spade::new(context, c, pb.pp("spade"))?,
            up: ConvTranspose2d::new(
                c,
                act.site_width(mid),
                16,
                2,
                7,
                InitKind::Torch,
                pb.pp("conv1").pp(0),
            )?,
            conv: Conv2d::new(
                mid,
                act.site_width(c),
                5,
                conv_cfg,
                true,
                InitKind::Torch,
                pb.pp("conv1").pp(2),
            )?,
            act,
        })
    }

    /// x [B, C, H, W] -> [B, C, 2H, 2W]
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let h = match context {
            Some(ctx) => self.spade.forward(x, ctx)?,
            None => x.clone(),
        };
        let h = self.act.apply(&self.up.forward(&h)?)?;
        let h = self.act.apply(&self.conv.forward(&h)?)?;
        h + (upsample_nearest2x(x)? * 0.1)?
    }
}

/// FluxExpander: packed tokens [B, H*W + 1, D] -> image [B, 3, 16H, 16W] in [-1, 1] scale.
#[derive(Debug, Clone)]
pub struct FluxExpander {
    layers: Vec<ResidualUpsampleBlock>,
    /// Saved with the model; the reference's forward never calls it.
    context_mixer: ContextAttentionMixer,
    rgb_conv1: Conv2d,
    rgb_norm1: GroupNorm,
    rgb_conv2: Conv2d,
    rgb_norm2: GroupNorm,
    rgb_conv3: Conv2d,
    rgb_activation: TrainableBezier,
    max_hw: usize,
}

impl FluxExpander {
    pub fn new(cfg: &ModelConfig, pb: Pb) -> Result<Self> {
        let d = cfg.vae_dim;
        let up = pb.pp("upscale").pp("layers");
        let layers = (0..cfg.upscales)
            .map(|i| ResidualUpsampleBlock::new(d, cfg.wide(d), d, cfg.activation, up.pp(i)))
            .collect::<Result<_>>()?;
        let rgb = pb.pp("to_rgb_conv");
        let conv = |i: usize, o: usize, k: usize, p: usize, n: usize| {
            Conv2d::new(i, o, k, ConvCfg::pad(p), true, InitKind::Torch, rgb.pp(n))
        };
        Ok(Self {
            layers,
            context_mixer: ContextAttentionMixer::new(d, (d / 64).max(4), pb.pp("context_mixer"))?,
            rgb_conv1: conv(d, 96, 3, 1, 0)?,
            rgb_norm1: GroupNorm::new(8, 96, true, rgb.pp(1))?,
            rgb_conv2: conv(96, 48, 3, 1, 3)?,
            rgb_norm2: GroupNorm::new(8, 48, true, rgb.pp(4))?,
            rgb_conv3: conv(48, 3, 1, 0, 6)?,
            rgb_activation: TrainableBezier::new(
                &[3],
                [-1.0, 0.25, 0.75, 1.0],
                true,
                pb.pp("rgb_activation"),
            )?,
            max_hw: cfg.max_hw,
        })
    }

    /// The context mixer the reference creates (and saves) but never calls.
    pub fn context_mixer(&self) -> &ContextAttentionMixer {
        &self.context_mixer
    }

    /// Image tokens [B, T, D] and each sample's latent (H, W), read from the last token.
    pub fn unpack(&self, packed: &Tensor) -> Result<(Tensor, Vec<(usize, usize)>)> {
        let (b, t1, _) = packed.dims3()?;
        let sizes = latent_sizes(packed, self.max_hw)?;
        let img = packed.narrow(1, 0, t1 - 1)?;
        for &(h, w) in &sizes {
            if h * w > t1 - 1 {
                candle_core::bail!(
                    "packed latent says {h}x{w} tokens but holds {} (batch of {b})",
                    t1 - 1
                );
            }
        }
        Ok((img, sizes))
    }

    /// packed [B, T+1, D] -> [B, 3, H, W]. `use_context` switches SPADE on.
    pub fn forward(&self, packed: &Tensor, use_context: bool) -> Result<Tensor> {
        self.forward_rc(packed, use_context, &Recompute::off())
    }

    /// [`Self::forward`] with each upsampling block and the RGB head as segments of `rc`.
    pub fn forward_rc<'a>(
        &'a self,
        packed: &Tensor,
        use_context: bool,
        rc: &Recompute<'a>,
    ) -> Result<Tensor> {
        let (img, sizes) = self.unpack(packed)?;
        let b = sizes.len();
        if sizes.iter().all(|s| *s == sizes[0]) {
            return self.decode(&img, sizes[0], use_context, rc);
        }
        let outs = (0..b)
            .map(|i| self.decode(&img.narrow(0, i, 1)?, sizes[i], use_context, rc))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 0)
    }

    fn decode<'a>(
        &'a self,
        img: &Tensor,
        (h, w): (usize, usize),
        use_context: bool,
        rc: &Recompute<'a>,
    ) -> Result<Tensor> {
        let (b, _, d) = img.dims3()?;
        let feat = img
            .narrow(1, 0, h * w)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, d, h, w))?;
        let mut x = feat.clone();
        for layer in &self.layers {
            x = if use_context {
                rc.segment(&[&x, &feat], move |t: &[Tensor]| {
                    layer.forward(&t[0], Some(&t[1]))
                })?
            } else {
                rc.segment(&[&x], move |t: &[Tensor]| layer.forward(&t[0], None))?
            };
        }
        rc.segment(&[&x], move |t: &[Tensor]| self.to_rgb(&t[0]))
    }

    /// The RGB head: [B, D, H, W] -> [B, 3, H, W].
    fn to_rgb(&self, x: &Tensor) -> Result<Tensor> {
        let x = self
            .rgb_norm1
            .forward(&self.rgb_conv1.forward(x)?)?
            .silu()?;
        let x = self
            .rgb_norm2
            .forward(&self.rgb_conv2.forward(&x)?)?
            .silu()?;
        self.rgb_activation.forward(&self.rgb_conv3.forward(&x)?)
    }
}
