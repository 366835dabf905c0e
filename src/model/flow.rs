//! Ports `FluxFlowProcessor`, `FluxTransformerBlock`, `ParallelAttention` and
//! `RotaryPositionalEmbedding` from fluxflow-core's `models/flow.py` (Phase 2; saved but not
//! trained in Phase 1).

use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::bezier::{BezierActivation, TrainableBezier};
use super::compressor::{add_coord_channels, latent_sizes};
use super::conditioning::{mean_tokens, ContextAttentionMixer, GatedContextInjection};
use super::config::ModelConfig;
use crate::nn::{
    attention, merge_heads, split_heads, Conv2d, ConvCfg, Embedding, InitKind, LayerNorm, Linear,
};
use crate::params::Pb;

/// sin and cos tables [T, Dh] of the rotary embedding (each frequency repeated twice).
struct Rotary {
    sin: Tensor,
    cos: Tensor,
}

impl Rotary {
    fn new(inv_freq: &Tensor, len: usize) -> Result<Self> {
        let pos = Tensor::arange(0u32, len as u32, inv_freq.device())?
            .to_dtype(inv_freq.dtype())?
            .unsqueeze(1)?;
        let s = pos.broadcast_mul(&inv_freq.unsqueeze(0)?)?; // [T, Dh/2]
        let twice = |t: Tensor| -> Result<Tensor> {
            let (l, f) = t.dims2()?;
            t.unsqueeze(2)?.broadcast_as((l, f, 2))?.reshape((l, 2 * f))
        };
        Ok(Self {
            sin: twice(s.sin()?)?,
            cos: twice(s.cos()?)?,
        })
    }

    /// x [B, H, T, Dh]: x * cos + cat(-x2, x1) * sin, halves x1, x2 of the last axis.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dh = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, dh / 2)?;
        let x2 = x.narrow(D::Minus1, dh / 2, dh - dh / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&self.cos)?
            .add(&rot.broadcast_mul(&self.sin)?)
    }
}

/// ParallelAttention: queries from one sequence, packed keys/values from another.
#[derive(Debug, Clone)]
struct ParallelAttention {
    q_proj: Linear,
    kv_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl ParallelAttention {
    fn new(d: usize, heads: usize, pb: Pb) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::new(d, d, InitKind::Xavier, pb.pp("q_proj"))?,
            kv_proj: Linear::new(d, 2 * d, InitKind::Xavier, pb.pp("kv_proj"))?,
            out_proj: Linear::new(d, d, InitKind::Xavier, pb.pp("out_proj"))?,
            heads,
        })
    }

    fn forward(&self, xq: &Tensor, xkv: &Tensor, rq: &Rotary, rk: &Rotary) -> Result<Tensor> {
        let d = xq.dim(D::Minus1)?;
        let q = split_heads(&self.q_proj.forward(xq)?, self.heads)?;
        let kv = self.kv_proj.forward(xkv)?;
        let k = split_heads(&kv.narrow(D::Minus1, 0, d)?, self.heads)?;
        let v = split_heads(&kv.narrow(D::Minus1, d, d)?, self.heads)?;
        let scale = ((d / self.heads) as f64).powf(-0.5);
        let out = attention(&rq.apply(&q)?, &rk.apply(&k)?, &v, scale)?;
        self.out_proj.forward(&merge_heads(&out)?)
    }
}

/// `pillarLayer(d, d, depth 3, SiLU)`: three Linear + SiLU pairs.
#[derive(Debug, Clone)]
struct Pillar(Vec<Linear>);

impl Pillar {
    fn new(d: usize, pb: Pb) -> Result<Self> {
        let layers = (0..3)
            .map(|i| Linear::new(d, d, InitKind::Xavier, pb.pp(i).pp(0)))
            .collect::<Result<_>>()?;
        Ok(Self(layers))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0
            .iter()
            .try_fold(x.clone(), |x, l| l.forward(&x)?.silu())
    }
}

/// FluxTransformerBlock: self-attention, cross-attention to text, gated Bezier control points.
#[derive(Debug, Clone)]
struct FluxTransformerBlock {
    self_attn: ParallelAttention,
    cross_attn: ParallelAttention,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm3: LayerNorm,
    pillars: [Pillar; 4],
    ffn: Linear,
    inv_freq: Tensor,
}

impl FluxTransformerBlock {
    fn new(d: usize, heads: usize, pb: Pb) -> Result<Self> {
        let half = (d / heads) / 2;
        // 1 / 10000^(i / half) in float32, as the reference's buffer.
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| (1.0f32 / 10000f32.powf(i as f32 / half as f32)) as f64)
            .collect();
        let pillar = |i: usize| Pillar::new(d, pb.pp(format!("p{i}")));
        Ok(Self {
            self_attn: ParallelAttention::new(d, heads, pb.pp("self_attn"))?,
            cross_attn: ParallelAttention::new(d, heads, pb.pp("cross_attn"))?,
            norm1: LayerNorm::new(d, pb.pp("norm1"))?,
            norm2: LayerNorm::new(d, pb.pp("norm2"))?,
            norm3: LayerNorm::new(d, pb.pp("norm3"))?,
            pillars: [pillar(0)?, pillar(1)?, pillar(2)?, pillar(3)?],
            ffn: Linear::new(d, d, InitKind::Xavier, pb.pp("ffn").pp(0))?,
            inv_freq: pb.pp("rotary_pe").buffer("inv_freq", &[half], inv_freq)?,
        })
    }

    fn forward(
        &self,
        img: &Tensor,
        text: &Tensor,
        (r_img, r_txt): (&Rotary, &Rotary),
        p_in: Option<&[Tensor; 4]>,
    ) -> Result<(Tensor, [Tensor; 4])> {
        let n = self.norm1.forward(img)?;
        let img = (img + self.self_attn.forward(&n, &n, r_img, r_img)?)?;
        let q = self.norm2.forward(&img)?;
        let kv = self.norm2.forward(text)?;
        let img = (&img + self.cross_attn.forward(&q, &kv, r_img, r_txt)?)?;
        let g = candle_nn::ops::sigmoid(&img)?;
        let mut ps = Vec::with_capacity(4);
        for (i, pillar) in self.pillars.iter().enumerate() {
            let input = match p_in {
                Some(p) => (&g * &p[i])?,
                None => g.clone(),
            };
            ps.push(pillar.forward(&input)?);
        }
        let img = (&img + self.ffn.forward(&self.norm3.forward(&img)?)?)?;
        let cat = Tensor::cat(&[&img, &ps[0], &ps[1], &ps[2], &ps[3]], D::Minus1)?;
        let out = BezierActivation::DEFAULT.forward(&cat)?;
        let [p0, p1, p2, p3]: [Tensor; 4] = ps
            .try_into()
            .map_err(|_| candle_core::Error::Msg("four pillars".into()))?;
        Ok((out, [p0, p1, p2, p3]))
    }
}

/// FluxFlowProcessor: packed latent [B, T+1, Dv], text [B, E], t [B] -> packed [B, T+1, Dv].
#[derive(Debug, Clone)]
pub struct FluxFlowProcessor {
    vae_to_dmodel: Linear,
    dmodel_to_vae: Linear,
    ctx_mixer: ContextAttentionMixer,
    text_proj: Linear,
    time_embedding: Embedding,
    time_norm: LayerNorm,
    time_bezier: TrainableBezier,
    time_out: Linear,
    context_injection: GatedContextInjection,
    blocks: Vec<FluxTransformerBlock>,
    flow_conv1: Conv2d,
    flow_bezier: TrainableBezier,
    flow_conv2: Conv2d,
    final_conv: Conv2d,
    final_bezier: TrainableBezier,
    max_hw: usize,
    ctx_tokens: usize,
}

impl FluxFlowProcessor {
    pub fn new(cfg: &ModelConfig, pb: Pb) -> Result<Self> {
        let (d, dv, e) = (cfg.flow_dim, cfg.vae_dim, cfg.text_embedding_dim);
        let torch = InitKind::Torch;
        let te = pb.pp("time_embed");
        let fp = pb.pp("flow_predictor");
        let cf = pb.pp("context_final");
        let blocks = (0..cfg.flow_layers)
            .map(|i| {
                FluxTransformerBlock::new(d, cfg.flow_heads, pb.pp("transformer_blocks").pp(i))
            })
            .collect::<Result<_>>()?;
        let init = TrainableBezier::DEFAULT_INIT;
        Ok(Self {
            vae_to_dmodel: Linear::new(dv, d, torch, pb.pp("vae_to_dmodel"))?,
            dmodel_to_vae: Linear::new(d, dv, torch, pb.pp("dmodel_to_vae"))?,
            ctx_mixer: ContextAttentionMixer::new(d, (d / 128).max(1), pb.pp("ctx_mixer"))?,
            text_proj: Linear::new(e, d, torch, pb.pp("text_proj"))?,
            time_embedding: Embedding::new(1000, d, te.pp(0))?,
            time_norm: LayerNorm::new(d, te.pp(1))?,
            time_bezier: TrainableBezier::new(&[d], init, false, te.pp(2))?,
            time_out: Linear::new(d, e, torch, te.pp(3))?,
            context_injection: GatedContextInjection::new(d, d, pb.pp("context_injection"))?,
            blocks,
            flow_conv1: Conv2d::new(d, d, 5, ConvCfg::pad(2), true, torch, fp.pp(0))?,
            flow_bezier: TrainableBezier::new(&[d, 1, 1], init, false, fp.pp(1))?,
            flow_conv2: Conv2d::new(d, d, 3, ConvCfg::pad(1), true, torch, fp.pp(2))?,
            final_conv: Conv2d::new(d + 2, d, 7, ConvCfg::pad(3), true, torch, cf.pp(0))?,
            final_bezier: TrainableBezier::new(&[d, 1, 1], init, false, cf.pp(1))?,
            max_hw: cfg.max_hw,
            ctx_tokens: cfg.ctx_tokens,
        })
    }

    /// packed [B, T+1, Dv], text [B, E], timesteps [B] in [0, 1] -> [B, T+1, Dv]
    pub fn forward(&self, packed: &Tensor, text: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (b, t1, _) = packed.dims3()?;
        let t = t1 - 1;
        let img_v = packed.narrow(1, 0, t)?;
        let hw_vec = packed.narrow(1, t, 1)?;
        let sizes = latent_sizes(packed, self.max_hw)?;

        let img = self.vae_to_dmodel.forward(&img_v)?;
        let k = self.ctx_tokens.min(t);
        let (mut ctx_agg, _) = self.ctx_mixer.forward(&img.narrow(1, 0, k)?)?;

        let ids = self.timestep_ids(timesteps)?;
        let temb = self.time_embedding.forward(&ids)?;
        let temb = self
            .time_out
            .forward(&self.time_bezier.forward(&self.time_norm.forward(&temb)?)?)?;
        let cond = (text + temb)?;
        let text_seq = self.text_proj.forward(&cond)?.unsqueeze(1)?;

        let inv_freq = &self.blocks[0].inv_freq;
        let r_img = Rotary::new(inv_freq, t)?;
        let r_txt = Rotary::new(inv_freq, 1)?;
        let mut img = img;
        let mut ps: Option<[Tensor; 4]> = None;
        for block in &self.blocks {
            img = self.context_injection.forward(&img, &ctx_agg)?;
            let (next, p) = block.forward(&img, &text_seq, (&r_img, &r_txt), ps.as_ref())?;
            img = next;
            ps = Some(p);
            ctx_agg = (ctx_agg + mean_tokens(&img)?)?;
        }

        let img_v_all = self.dmodel_to_vae.forward(&img)?;
        let groups: Vec<Vec<usize>> = if sizes.iter().all(|s| *s == sizes[0]) {
            vec![(0..b).collect()]
        } else {
            (0..b).map(|i| vec![i]).collect()
        };
        let mut outs = Vec::with_capacity(groups.len());
        for g in groups {
            let (start, n) = (g[0], g.len());
            let (mut h, mut w) = sizes[start];
            let t_valid = (h * w).min(t);
            if t_valid < h * w {
                h = (t_valid as f64).sqrt() as usize;
                w = t_valid / h;
            }
            let d = img.dim(2)?;
            let feat = img
                .narrow(0, start, n)?
                .narrow(1, 0, h * w)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((n, d, h, w))?;
            let flow = self
                .flow_conv2
                .forward(&self.flow_bezier.forward(&self.flow_conv1.forward(&feat)?)?)?;
            let ctx = self
                .final_bezier
                .forward(&self.final_conv.forward(&add_coord_channels(&flow)?)?)?;
            let pooled = ctx.flatten_from(2)?.mean(2)?; // [n, D]
            let upd = self.dmodel_to_vae.forward(&pooled)?.unsqueeze(1)?; // [n, 1, Dv]
            let mine = img_v_all.narrow(0, start, n)?;
            let k_i = self.ctx_tokens.min(t_valid);
            let mine = if k_i == t {
                mine.broadcast_add(&upd)?
            } else if k_i > 0 {
                let head = mine.narrow(1, 0, k_i)?.broadcast_add(&upd)?;
                Tensor::cat(&[&head, &mine.narrow(1, k_i, t - k_i)?], 1)?
            } else {
                mine
            };
            outs.push(Tensor::cat(&[&mine, &hw_vec.narrow(0, start, n)?], 1)?);
        }
        Tensor::cat(&outs, 0)
    }

    /// (t * 999) truncated and clamped to 0..=999, as u32 indices.
    fn timestep_ids(&self, timesteps: &Tensor) -> Result<Tensor> {
        let ts: Vec<f64> = timesteps.to_dtype(DType::F64)?.to_vec1()?;
        let ids: Vec<u32> = ts
            .iter()
            .map(|t| (t * 999.0).trunc().clamp(0.0, 999.0) as u32)
            .collect();
        Tensor::from_vec(ids, ts.len(), &Device::Cpu)?.to_device(timesteps.device())
    }
}
