//! Ports `FluxCompressor` (the VAE encoder) from fluxflow-core's `models/vae.py`.

use candle_core::{DType, Device, Module, Result, Tensor};
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use super::activation::Activation;
use super::bezier::TrainableBezier;
use super::config::ModelConfig;
use super::recompute::Recompute;
use crate::nn::{Conv2d, ConvCfg, InitKind, LayerNorm, Linear, MultiheadAttention};
use crate::params::Pb;

/// Where the reparameterisation's normal draw comes from.
pub enum Noise<'a> {
    /// z = mu + eps * exp(logvar / 2) with this eps (same shape as mu).
    Given(&'a Tensor),
    /// A fresh eps drawn from this RNG (on the host, so a seed reproduces it on any device).
    Sampled(&'a mut StdRng),
    /// z = mu: the posterior mean, for reconstruction.
    Mean,
}

/// Everything the encoder computes.
pub struct Encoded {
    /// [B, H*W + 1, D]: image tokens and the H/W token.
    pub packed: Tensor,
    /// [B, D, H, W] after the TrainableBezier activation.
    pub mu: Tensor,
    /// [B, D, H, W] after the TrainableBezier activation.
    pub logvar: Tensor,
}

/// A conv followed by the VAE's Bezier activation (`nn.Sequential(conv, BezierActivation)`),
/// or, for a baseline, a conv to `out_c` followed by the plain activation.
#[derive(Debug, Clone)]
struct ConvBezier {
    conv: Conv2d,
    act: Activation,
}

impl ConvBezier {
    #[allow(clippy::too_many_arguments)]
    fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        cfg: ConvCfg,
        bias: bool,
        act: Activation,
        pb: Pb,
    ) -> Result<Self> {
        let out = act.site_width(out_c);
        let conv = Conv2d::new(in_c, out, k, cfg, bias, InitKind::Torch, pb.pp(0))?;
        Ok(Self { conv, act })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.act.apply(&self.conv.forward(x)?)
    }
}

/// The pre-norm self-attention block of the token stage (`AttnBlock`).
#[derive(Debug, Clone)]
struct AttnBlock {
    norm1: LayerNorm,
    attn: MultiheadAttention,
    norm2: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    act: Activation,
}

impl AttnBlock {
    /// `hidden`: the feed-forward width (dim x 2 in the reference).
    fn new(dim: usize, heads: usize, hidden: usize, act: Activation, pb: Pb) -> Result<Self> {
        let ff_in = act.site_width(hidden);
        Ok(Self {
            norm1: LayerNorm::new(dim, pb.pp("norm1"))?,
            attn: MultiheadAttention::new(dim, heads, pb.pp("attn"))?,
            norm2: LayerNorm::new(dim, pb.pp("norm2"))?,
            ff_in: Linear::new(dim, ff_in, InitKind::Torch, pb.pp("ff").pp(0))?,
            ff_out: Linear::new(hidden, dim, InitKind::Torch, pb.pp("ff").pp(2))?,
            act,
        })
    }

    /// [B, T, D] -> [B, T, D]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let h = self
            .act
            .apply(&self.ff_in.forward(&self.norm2.forward(&x)?)?)?;
        x + self.ff_out.forward(&h)?
    }
}

/// torch.linspace(start, end, steps) in float32, with PyTorch's CPU formula (the first half
/// counts up from start, the second half down from end).
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// Stage widths: round(linspace(in+2, max(d, 8), downscales + 1)), half to even like Python.
pub fn stage_channels(in_channels: usize, d: usize, downscales: usize) -> Vec<usize> {
    linspace_f32((in_channels + 2) as f32, d.max(8) as f32, downscales + 1)
        .into_iter()
        .map(|c| c.round_ties_even() as usize)
        .collect()
}

/// Appends x then y coordinate channels (linspace -1..1). [B, C, H, W] -> [B, C+2, H, W]
pub fn add_coord_channels(x: &Tensor) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let xs: Vec<f32> = linspace_f32(-1.0, 1.0, w);
    let ys: Vec<f32> = linspace_f32(-1.0, 1.0, h);
    let mut data = Vec::with_capacity(2 * h * w);
    for _ in 0..h {
        data.extend_from_slice(&xs);
    }
    for &y in &ys {
        data.extend(std::iter::repeat_n(y, w));
    }
    let coords = Tensor::from_vec(data, (1, 2, h, w), &Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())?
        .broadcast_as((b, 2, h, w))?;
    Tensor::cat(&[x, &coords], 1)
}

/// The fixed 2-D sin/cos position code, [H*W, D]: the first D - D/2 slots encode the row,
/// the last D/2 the column.
pub fn sincos_2d(h: usize, w: usize, d: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    fn pe_1d(len: usize, c: usize) -> Vec<Vec<f64>> {
        let k = -(10000f64.ln()) / c as f64;
        let divs: Vec<f64> = (0..c).step_by(2).map(|i| (i as f64 * k).exp()).collect();
        (0..len)
            .map(|p| {
                (0..c)
                    .map(|j| {
                        let a = p as f64 * divs[j / 2];
                        if j % 2 == 0 {
                            a.sin()
                        } else {
                            a.cos()
                        }
                    })
                    .collect()
            })
            .collect()
    }
    let cx = d / 2;
    let cy = d - cx;
    let pe_x = pe_1d(w, cx);
    let pe_y = pe_1d(h, cy);
    let mut data = Vec::with_capacity(h * w * d);
    for row in &pe_y {
        for col in &pe_x {
            data.extend_from_slice(row);
            data.extend_from_slice(col);
        }
    }
    Tensor::from_vec(data, (h * w, d), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// FluxCompressor: image [B, 3, H, W] -> packed tokens [B, H/16 * W/16 + 1, D].
#[derive(Debug, Clone)]
pub struct FluxCompressor {
    encoder_first_step: Vec<ConvBezier>,
    encoder_z: Vec<ConvBezier>,
    latent_proj: Vec<ConvBezier>,
    mu_proj: Vec<ConvBezier>,
    logvar_proj: Vec<ConvBezier>,
    mu_activation: TrainableBezier,
    logvar_activation: TrainableBezier,
    token_attn: Vec<AttnBlock>,
    d_model: usize,
    max_hw: usize,
}

impl FluxCompressor {
    pub fn new(cfg: &ModelConfig, pb: Pb) -> Result<Self> {
        let d = cfg.vae_dim;
        let act = cfg.activation;
        // A baseline widens every width between two sites (all of them for Bezier: 1x).
        let ch: Vec<usize> = stage_channels(cfg.in_channels, d, cfg.downscales)
            .into_iter()
            .enumerate()
            .map(|(i, c)| if i == 0 { c } else { cfg.wide(c) })
            .collect();
        let mut encoder_first_step = Vec::new();
        let mut encoder_z = Vec::new();
        for i in 0..cfg.downscales {
            encoder_first_step.push(ConvBezier::new(
                ch[i],
                ch[i + 1],
                3,
                ConvCfg::pad(1),
                false,
                act,
                pb.pp("encoder_first_step").pp(i),
            )?);
            let down = ConvCfg {
                padding: 3,
                stride: 2,
                dilation: 1,
            };
            encoder_z.push(ConvBezier::new(
                ch[i + 1],
                ch[i + 1],
                8,
                down,
                true,
                act,
                pb.pp("encoder_z").pp(i),
            )?);
        }
        // Two 1x1 sites, in_c -> d -> d; the width between them is internal.
        let heads = |name: &str, in_c: usize| -> Result<Vec<ConvBezier>> {
            let (mid, pc) = (cfg.wide(d), ConvCfg::pad(0));
            Ok(vec![
                ConvBezier::new(in_c, mid, 1, pc, true, act, pb.pp(name).pp(0))?,
                ConvBezier::new(mid, d, 1, pc, true, act, pb.pp(name).pp(1))?,
            ])
        };
        let final_ch = ch[cfg.downscales];
        let hidden = cfg.wide(d * 2);
        let token_attn = (0..cfg.vae_attn_layers)
            .map(|i| {
                let pb = pb.pp("token_attn").pp(i);
                AttnBlock::new(d, cfg.vae_attn_heads, hidden, act, pb)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            encoder_first_step,
            encoder_z,
            latent_proj: heads("latent_proj", final_ch)?,
            mu_proj: heads("mu_proj", d)?,
            logvar_proj: heads("logvar_proj", d)?,
            mu_activation: TrainableBezier::new(
                &[d],
                [-2.0, -0.5, 0.5, 2.0],
                true,
                pb.pp("mu_activation"),
            )?,
            logvar_activation: TrainableBezier::new(
                &[d],
                [-3.0, -1.0, 1.0, 3.0],
                true,
                pb.pp("logvar_activation"),
            )?,
            token_attn,
            d_model: d,
            max_hw: cfg.max_hw,
        })
    }

    /// [B, 3, H, W] -> packed [B, T+1, D], mu and logvar [B, D, H/16, W/16].
    pub fn forward(&self, img: &Tensor, noise: Noise) -> Result<Encoded> {
        self.forward_rc(img, noise, &Recompute::off())
    }

    /// [`Self::forward`] with the reference's checkpointed blocks (the downsampling stack and
    /// each attention block) as segments of `rc`.
    pub fn forward_rc<'a>(
        &'a self,
        img: &Tensor,
        noise: Noise,
        rc: &Recompute<'a>,
    ) -> Result<Encoded> {
        let x = rc.segment(&[img], move |t: &[Tensor]| {
            let mut x = add_coord_channels(&t[0])?;
            for (first, z) in self.encoder_first_step.iter().zip(&self.encoder_z) {
                x = z.forward(&first.forward(&x)?)?;
            }
            Ok(x)
        })?;
        let seq = |stack: &[ConvBezier], x: &Tensor| -> Result<Tensor> {
            stack.iter().try_fold(x.clone(), |x, l| l.forward(&x))
        };
        let latent = seq(&self.latent_proj, &x)?;
        let mu = self.mu_activation.forward(&seq(&self.mu_proj, &latent)?)?;
        let logvar = self
            .logvar_activation
            .forward(&seq(&self.logvar_proj, &latent)?)?;
        let z = match noise {
            Noise::Mean => mu.clone(),
            Noise::Given(eps) => {
                let eps = eps.to_dtype(mu.dtype())?;
                (&mu + eps.mul(&(&logvar * 0.5)?.exp()?)?)?
            }
            Noise::Sampled(rng) => {
                let eps = normal_like(&mu, rng)?;
                (&mu + eps.mul(&(&logvar * 0.5)?.exp()?)?)?
            }
        };
        let (b, d, h, w) = latent.dims4()?;
        let tokens = |t: &Tensor| -> Result<Tensor> { t.flatten_from(2)?.transpose(1, 2) };
        let pe = sincos_2d(h, w, d, z.dtype(), z.device())?;
        let mut seq_t = tokens(&z)?.broadcast_add(&pe)?.add(&tokens(&latent)?)?;
        // One segment per block (the reference checkpoints the stack as one): the backward pass
        // then holds one block's attention scores at a time.
        for blk in &self.token_attn {
            seq_t = rc.segment(&[&seq_t], move |t: &[Tensor]| blk.forward(&t[0]))?;
        }
        let mut hw = vec![0f64; d];
        hw[0] = h as f64 / self.max_hw as f64;
        hw[1] = w as f64 / self.max_hw as f64;
        let hw = Tensor::from_vec(hw, (1, 1, d), &Device::Cpu)?
            .to_dtype(z.dtype())?
            .to_device(z.device())?
            .broadcast_as((b, 1, d))?;
        let packed = Tensor::cat(&[&seq_t, &hw], 1)?;
        Ok(Encoded { packed, mu, logvar })
    }

    pub fn d_model(&self) -> usize {
        self.d_model
    }
}

/// Each sample's latent (H, W) from the H/W token (the last token) of packed latents
/// [B, T+1, D]: round(value * max_hw), at least 1 (the reference's `unpack`).
pub fn latent_sizes(packed: &Tensor, max_hw: usize) -> Result<Vec<(usize, usize)>> {
    let (_, t1, d) = packed.dims3()?;
    if t1 < 2 || d < 2 {
        candle_core::bail!(
            "packed latent of shape {:?} holds no image tokens",
            packed.dims()
        );
    }
    let hw: Vec<Vec<f64>> = packed
        .narrow(1, t1 - 1, 1)?
        .squeeze(1)?
        .narrow(1, 0, 2)?
        .to_dtype(DType::F64)?
        .to_vec2()?;
    let f = |x: f64| (x * max_hw as f64).round().max(1.0) as usize;
    Ok(hw.iter().map(|v| (f(v[0]), f(v[1]))).collect())
}

/// A standard normal tensor shaped like `like`, drawn on the host from `rng`.
pub fn normal_like(like: &Tensor, rng: &mut StdRng) -> Result<Tensor> {
    let n = like.elem_count();
    let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, like.shape(), &Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())
}
