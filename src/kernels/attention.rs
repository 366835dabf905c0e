//! softmax(q k^T * scale) v with memory linear in the number of tokens, in inference and in
//! training.
//!
//! The queries go in chunks whose score matrices hold at most `budget` elements; each query row
//! still sees every key, so the result is the whole matrix's, row for row. Without gradients
//! that is all. With gradients, [`AttentionOp`] keeps only q, k, v and the output for the
//! backward pass, which recomputes each chunk's scores and softmax instead of keeping them:
//! candle's autograd of the composition would keep the score matrix and its softmax (for
//! 4096 latent tokens, a 1024x1024 image, 2 x 8 x 4096 x 4096 elements each per block).
//!
//! Per chunk of `c` queries the backward pass holds about five `[B, H, c, Sk]` temporaries
//! (softmax, its gradient, their product, the scores' gradient and its scaled copy), so at most
//! about 5 x `budget` elements at a time.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::softmax::{softmax_backward, softmax_last};

/// Queries per chunk for `rows` score elements per query (B x H x Sk) under `budget`.
fn chunk_len(rows: usize, budget: usize) -> usize {
    (budget / rows.max(1)).max(1)
}

/// The attention of detached inputs in query chunks (no graph).
fn forward_chunks(
    q: &Tensor,
    kt: &Tensor,
    v: &Tensor,
    scale: f64,
    budget: usize,
) -> Result<Tensor> {
    let (b, h, sq, _) = q.dims4()?;
    let sk = kt.dim(3)?;
    let full = |q: &Tensor| -> Result<Tensor> {
        let scores = (q.contiguous()?.matmul(kt)? * scale)?;
        softmax_last(&scores)?.matmul(v)
    };
    let chunk = chunk_len(b * h * sk, budget);
    if sq <= chunk {
        return full(q);
    }
    let parts = (0..sq)
        .step_by(chunk)
        .map(|s0| full(&q.narrow(2, s0, chunk.min(sq - s0))?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 2)
}

/// softmax(q k^T * scale) v for [B, H, Sq, Dh] queries and [B, H, Sk, Dh] keys and values, in
/// query chunks of at most `budget` score elements; differentiable in q, k and v with the
/// backward pass of [`AttentionOp`].
///
/// On CUDA, unless [`super::unverified_cuda_paths`] is on, a tracked attention is the
/// whole-matrix composition that candle's autograd differentiates (the path of the last GPU
/// run; its memory grows with the square of the tokens).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, budget: usize) -> Result<Tensor> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if tracked && q.device().is_cuda() && !super::unverified_cuda_paths() {
        let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
        return softmax_last(&scores)?.matmul(&v.contiguous()?);
    }
    let kt = k.detach().t()?.contiguous()?;
    let y = forward_chunks(&q.detach(), &kt, &v.detach().contiguous()?, scale, budget)?;
    if !tracked {
        return Ok(y);
    }
    let op = AttentionOp {
        scale,
        budget,
        y: Mutex::new(Some(y)),
    };
    q.apply_op3(k, v, op)
}

/// The attention as one op of the graph: its forward pass hands over the output computed in
/// chunks (`y`, taken once), its backward pass recomputes the scores chunk by chunk.
struct AttentionOp {
    scale: f64,
    budget: usize,
    y: Mutex<Option<Tensor>>,
}

impl AttentionOp {
    /// The precomputed output (taken: the op keeps no copy) and its shape.
    fn take_output(&self) -> Result<(Tensor, Shape)> {
        let y = self
            .y
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned output".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attention: forward pass run twice".into()))?;
        let shape = y.shape().clone();
        Ok((y, shape))
    }
}

/// Checks that the precomputed output's storage holds exactly its elements, as a fresh
/// contiguous tensor (a matrix product's or a concatenation's result) does: the forward pass
/// hands over a clone of that whole storage.
fn fresh_layout_ok(l: &Layout) -> Result<()> {
    if l.start_offset() != 0 || !l.is_contiguous() {
        candle_core::bail!("attention: the precomputed output is not a fresh contiguous tensor");
    }
    Ok(())
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "chunked-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, shape) = self.take_output()?;
        let (st, l) = y.storage_and_layout();
        fresh_layout_ok(l)?;
        match &*st {
            Storage::Cpu(s) => Ok((s.try_clone(l)?, shape)),
            _ => candle_core::bail!("attention: the output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (y, shape) = self.take_output()?;
        let (st, l) = y.storage_and_layout();
        fresh_layout_ok(l)?;
        match &*st {
            Storage::Cuda(s) => Ok((s.try_clone(l)?, shape)),
            _ => candle_core::bail!("attention: the output is not on CUDA"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, dy) = (q.detach(), k.detach(), v.detach(), dy.detach());
        let (b, h, sq, _) = q.dims4()?;
        let sk = k.dim(2)?;
        let kt = k.t()?.contiguous()?;
        let vt = v.t()?.contiguous()?;
        let k = k.contiguous()?;
        let chunk = chunk_len(b * h * sk, self.budget);
        let mut dq = Vec::with_capacity(sq.div_ceil(chunk));
        let (mut dk, mut dv): (Option<Tensor>, Option<Tensor>) = (None, None);
        for s0 in (0..sq).step_by(chunk) {
            let c = chunk.min(sq - s0);
            let qc = q.narrow(2, s0, c)?.contiguous()?;
            let dyc = dy.narrow(2, s0, c)?.contiguous()?;
            let p = softmax_last(&(qc.matmul(&kt)? * self.scale)?)?;
            let ds = (softmax_backward(&p, &dyc.matmul(&vt)?)? * self.scale)?;
            dq.push(ds.matmul(&k)?);
            let dkc = ds.t()?.matmul(&qc)?;
            let dvc = p.t()?.matmul(&dyc)?;
            dk = Some(match dk {
                Some(a) => (a + dkc)?,
                None => dkc,
            });
            dv = Some(match dv {
                Some(a) => (a + dvc)?,
                None => dvc,
            });
        }
        let dq = if dq.len() == 1 {
            dq.pop()
        } else {
            Some(Tensor::cat(&dq, 2)?)
        };
        Ok((dq, dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{check_finite_differences, rel_l2};
    use candle_core::{Device, Var, D};

    /// The composition candle's autograd differentiates: the whole score matrix.
    fn whole(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    fn vars(dims: [(usize, usize, usize, usize); 3]) -> Vec<Var> {
        dims.iter()
            .map(|&d| {
                Var::from_tensor(&Tensor::randn(0f64, 1.0, d, &Device::Cpu).unwrap()).unwrap()
            })
            .collect()
    }

    #[test]
    fn chunked_attention_without_gradients_equals_the_whole_matrix() {
        let dev = Device::Cpu;
        // 2 x 2 x 50 queries against 40 keys under a budget of 1000 scores: chunks of 6
        // queries, the last one shorter.
        let q = Tensor::randn(0f64, 1.0, (2, 2, 50, 4), &dev).unwrap();
        let k = Tensor::randn(0f64, 1.0, (2, 2, 40, 4), &dev).unwrap();
        let v = Tensor::randn(0f64, 1.0, (2, 2, 40, 4), &dev).unwrap();
        let chunked = attention(&q, &k, &v, 0.5, 1000).unwrap();
        let d = rel_l2(&chunked, &whole(&q, &k, &v, 0.5));
        assert!(d < 1e-12, "chunked attention differs by {d:e}");
    }

    /// Value and the gradients of q, k and v against a random cotangent, through the op with
    /// `budget` and through candle's autograd of the whole matrix, in f64.
    #[test]
    fn chunked_attention_gradients_equal_the_whole_matrix() {
        // (q, k/v shapes, budget): several chunks with a short last one; one chunk; one query
        // per chunk; a single query and a single key; Sq != Sk with odd sizes.
        let cases = [
            ((2, 2, 50, 4), (2, 2, 40, 4), 1000),
            ((2, 2, 50, 4), (2, 2, 40, 4), 1 << 20),
            ((1, 3, 7, 5), (1, 3, 9, 5), 1),
            ((1, 1, 1, 3), (1, 1, 1, 3), 1000),
            ((2, 1, 33, 8), (2, 1, 17, 8), 100),
        ];
        for (qd, kd, budget) in cases {
            let x = vars([qd, kd, kd]);
            let (q, k, v) = (x[0].as_tensor(), x[1].as_tensor(), x[2].as_tensor());
            let r = Tensor::randn(0f64, 1.0, qd, &Device::Cpu).unwrap();
            let scale = 0.37;
            let ours = attention(q, k, v, scale, budget).unwrap();
            let want = whole(q, k, v, scale);
            let d = rel_l2(&ours, &want);
            assert!(d < 1e-12, "{qd:?}/{budget}: value differs by {d:e}");
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, t) in [("q", q), ("k", k), ("v", v)] {
                let (a, b) = (g1.get(t).expect("a gradient"), g2.get(t).unwrap());
                let d = rel_l2(a, b);
                assert!(d < 1e-10, "{qd:?}/{budget}: d{name} differs by {d:e}");
            }
        }
    }

    #[test]
    fn chunked_attention_gradient_passes_a_finite_difference_check() {
        let x = vars([(1, 2, 5, 3), (1, 2, 4, 3), (1, 2, 4, 3)]);
        let r = Tensor::randn(0f64, 1.0, (1, 2, 5, 3), &Device::Cpu).unwrap();
        // A budget of 8 scores: one query (2 heads x 4 keys) per chunk.
        let loss = |t: [&Tensor; 3]| {
            (attention(t[0], t[1], t[2], 0.6, 8).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let ts = [x[0].as_tensor(), x[1].as_tensor(), x[2].as_tensor()];
        let g = loss(ts).backward().unwrap();
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            let f = |xi: &Tensor| -> f64 {
                let mut t = ts;
                t[i] = xi;
                loss(t).to_scalar().unwrap()
            };
            let what = format!("attention d{name}");
            check_finite_differences(&f, ts[i], g.get(ts[i]).unwrap(), 1e-8, &what);
        }
    }
}
