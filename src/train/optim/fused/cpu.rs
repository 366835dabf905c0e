//! The fused optimizer update, EMA and gradient norm on the CPU: one parallel pass over a
//! parameter's elements (see the parent module for why and how they match the tensor
//! expressions bit for bit).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use super::super::Buffers;
use super::rule::{affine, Elem, MAX_BUFFERS};
use crate::kernels::SendPtr;

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;

/// The contiguous elements of a CPU tensor of element type `T`, if it is one.
fn slice_of<'a, T: Elem>(storage: &'a Storage, layout: &Layout) -> Option<&'a [T]> {
    let Storage::Cpu(cpu) = storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    T::cpu_storage_as_slice(cpu).ok().map(|s| &s[start..end])
}

/// Whether `t` is a contiguous CPU tensor of `dtype` (what the fused loops take).
pub(super) fn fusable(t: &Tensor, dtype: DType) -> bool {
    t.device().is_cpu() && t.dtype() == dtype && t.is_contiguous()
}

struct Update<'a, T, F> {
    grad: &'a [T],
    /// The gradient's factor (clipping), if it is scaled.
    scale: Option<T>,
    buffers: [Option<&'a [T]>; MAX_BUFFERS],
    /// The new buffers' storage: `n_buffers` vectors with room for `grad.len()` elements each,
    /// written through these pointers (their spare capacity).
    outputs: [SendPtr<T>; MAX_BUFFERS],
    n_buffers: usize,
    f: F,
    /// Set once `cpu_fwd` has written every element of every output: until then the outputs'
    /// lengths must stay 0.
    wrote_all: AtomicBool,
}

impl<T: Elem, F: Fn(T, T, &mut [T; MAX_BUFFERS]) -> T + Sync> InplaceOp1 for Update<'_, T, F> {
    fn name(&self) -> &'static str {
        "fused-optimizer-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fused update: parameter not contiguous".into())
        })?;
        let p = T::slice_mut(storage)
            .ok_or_else(|| candle_core::Error::Msg("fused update: parameter dtype".into()))?;
        let p = &mut p[start..end];
        if p.len() != self.grad.len() {
            candle_core::bail!(
                "fused update: {} parameters, {} gradients",
                p.len(),
                self.grad.len()
            );
        }
        let zero = T::zero();
        // Chunk c covers indices c * CHUNK .. c * CHUNK + pc.len(): the chunks tile 0..n, with
        // n == p.len() == grad.len(), the outputs' capacity (`update_as`).
        p.par_chunks_mut(CHUNK).enumerate().for_each(|(c, pc)| {
            let off = c * CHUNK;
            for (j, pv) in pc.iter_mut().enumerate() {
                let i = off + j;
                let g = match self.scale {
                    Some(s) => affine(self.grad[i], s, zero),
                    None => self.grad[i],
                };
                let mut b = [zero; MAX_BUFFERS];
                for (v, src) in b.iter_mut().zip(&self.buffers[..self.n_buffers]) {
                    if let Some(s) = src {
                        *v = s[i];
                    }
                }
                *pv = (self.f)(*pv, g, &mut b);
                for (v, dst) in b.iter().zip(&self.outputs[..self.n_buffers]) {
                    // SAFETY: each of the n_buffers outputs points to a vector's buffer with
                    // room for n elements (`update_as`, which keeps the vectors alive, unmoved
                    // and unread until this op has returned) and i < n; i belongs to this
                    // chunk alone, so no other thread touches element i of any output. T is
                    // Copy (no drop of the uninitialised old value is skipped or needed).
                    unsafe { dst.get().add(i).write(*v) };
                }
            }
        });
        // The parallel loop returned: every i < n of every output is written.
        self.wrote_all.store(true, Ordering::Release);
        Ok(())
    }
}

pub(super) fn update_as<T: Elem, F: Fn(T, T, &mut [T; MAX_BUFFERS]) -> T + Sync>(
    var: &Var,
    grad: &Tensor,
    scale: Option<f64>,
    names: &[&'static str],
    buffers: &mut Buffers,
    f: F,
) -> candle_core::Result<bool> {
    let param = var.as_tensor();
    let dtype = param.dtype();
    if names.len() > MAX_BUFFERS
        || !fusable(param, dtype)
        || !fusable(grad, dtype)
        || grad.shape() != param.shape()
        || names
            .iter()
            .filter_map(|n| buffers.get(n))
            .any(|b| !fusable(b, dtype) || b.shape() != param.shape())
    {
        return Ok(false);
    }
    let n = param.elem_count();
    let mut outputs: Vec<Vec<T>> = names.iter().map(|_| Vec::with_capacity(n)).collect();
    {
        let (gs, gl) = grad.storage_and_layout();
        let guards: Vec<_> = names
            .iter()
            .map(|name| buffers.get(name).map(|b| b.storage_and_layout()))
            .collect();
        let Some(g) = slice_of::<T>(&gs, gl) else {
            return Ok(false);
        };
        let mut bufs: [Option<&[T]>; MAX_BUFFERS] = [None; MAX_BUFFERS];
        for (k, guard) in guards.iter().enumerate() {
            if let Some((s, l)) = guard {
                match slice_of::<T>(s, l) {
                    Some(b) => bufs[k] = Some(b),
                    None => return Ok(false),
                }
            }
        }
        let mut ptrs = [SendPtr(std::ptr::null_mut()); MAX_BUFFERS];
        for (k, o) in outputs.iter_mut().enumerate() {
            // Valid for writes of the whole capacity (n elements); `as_mut_ptr` makes no
            // reference to the (empty) slice, so later uses of `o` do not invalidate it.
            ptrs[k] = SendPtr(o.as_mut_ptr());
        }
        let op = Update {
            grad: g,
            scale: scale.map(T::from_f64),
            buffers: bufs,
            outputs: ptrs,
            n_buffers: names.len(),
            f,
            wrote_all: AtomicBool::new(false),
        };
        // `cpu_fwd` writes elements 0..g.len() of the outputs (and fails unless the parameter
        // has as many): that must be their capacity n. (It is: grad has param's shape.)
        if g.len() != n {
            return Ok(false);
        }
        param.inplace_op1(&op)?;
        if !op.wrote_all.load(Ordering::Acquire) {
            candle_core::bail!("fused update: the CPU loop did not run");
        }
    }
    for (name, mut out) in names.iter().zip(outputs) {
        // SAFETY: `wrote_all` is set only after cpu_fwd's loop wrote elements 0..g.len() of
        // every output, and g.len() == n (both are the parameter's element count); out has
        // capacity n.
        unsafe { out.set_len(n) };
        buffers.insert(name, Tensor::from_vec(out, param.shape(), &Device::Cpu)?);
    }
    Ok(true)
}

pub(super) fn ema_as<T: Elem>(
    shadow: &Tensor,
    param: &Tensor,
    decay: f64,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = shadow.dtype();
    if !fusable(shadow, dtype) || !fusable(param, dtype) || shadow.shape() != param.shape() {
        return Ok(None);
    }
    let n = shadow.elem_count();
    let mut out: Vec<T> = Vec::with_capacity(n);
    {
        let (ss, sl) = shadow.storage_and_layout();
        let (ps, pl) = param.storage_and_layout();
        let (Some(s), Some(p)) = (slice_of::<T>(&ss, sl), slice_of::<T>(&ps, pl)) else {
            return Ok(None);
        };
        if s.len() != n || p.len() != n {
            return Ok(None);
        }
        let (d, k, zero) = (T::from_f64(decay), T::from_f64(1.0 - decay), T::zero());
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(s.par_chunks(CHUNK).zip(p.par_chunks(CHUNK)))
            .for_each(|(oc, (sc, pc))| {
                for ((o, &s), &p) in oc.iter_mut().zip(sc).zip(pc) {
                    o.write(affine(s, d, zero) + affine(p, k, zero));
                }
            });
    }
    // SAFETY: s and p hold n elements each (checked above), so the three chunkings agree and every chunk of out's first n spare elements is zipped with
    // chunks of s and p of its length, and written element by element; the loop returned.
    unsafe { out.set_len(n) };
    Ok(Some(Tensor::from_vec(out, shadow.shape(), &Device::Cpu)?))
}

/// The sum of squares of a CPU tensor's elements, accumulated in f64 over fixed chunks summed
/// in order (the same result for any thread count), or `None` when it is not a contiguous CPU
/// f32/f64 tensor.
pub(super) fn sum_squares_cpu(t: &Tensor) -> Option<f64> {
    fn as_t<T: Elem>(t: &Tensor) -> Option<f64> {
        if !fusable(t, t.dtype()) {
            return None;
        }
        let (s, l) = t.storage_and_layout();
        let v = slice_of::<T>(&s, l)?;
        let parts: Vec<f64> = v
            .par_chunks(CHUNK)
            .map(|c| {
                c.iter().fold(0f64, |acc, x| {
                    let x = x.to_f64();
                    acc + x * x
                })
            })
            .collect();
        Some(parts.iter().sum())
    }
    match t.dtype() {
        DType::F32 => as_t::<f32>(t),
        DType::F64 => as_t::<f64>(t),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::{
        AdamConfig, AdamWConfig, Buffers, LionConfig, RmsPropConfig, SgdConfig, UpdateRule,
    };
    use candle_core::{DType, Device, Tensor, Var};

    /// Bits of every element, to compare results exactly (NaN included).
    fn bits(t: &Tensor) -> Vec<u64> {
        match t.dtype() {
            DType::F32 => t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(|v| v.to_bits() as u64)
                .collect(),
            _ => t
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .into_iter()
                .map(f64::to_bits)
                .collect(),
        }
    }

    /// Three steps of `rule` on one parameter, through the tensor expressions and through the
    /// fused loop (with and without a gradient scale); parameters and buffers must agree bit
    /// for bit after every step.
    fn same_as_expressions<R: UpdateRule>(rule: &R, dtype: DType) {
        let dev = Device::Cpu;
        // 40_000 elements: more than one parallel chunk; some gradients zero, one parameter
        // zero, to reach the sign-of-zero cases.
        let n = 40_000;
        let p0 = (Tensor::randn(0f32, 1.0, n, &dev).unwrap() * 0.1)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        for scale in [None, Some(0.37)] {
            let (a, b) = (
                Var::from_tensor(&p0).unwrap(),
                Var::from_tensor(&p0).unwrap(),
            );
            let (mut ba, mut bb) = (Buffers::new(), Buffers::new());
            for step in 1..=3u64 {
                let g = Tensor::randn(0f32, 1.0, n, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let mask = Tensor::rand(0f32, 1.0, n, &dev)
                    .unwrap()
                    .ge(0.1)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let g = (g * mask).unwrap();
                let lr = 1e-3 * step as f64;
                let gs = match scale {
                    Some(s) => g.affine(s, 0.0).unwrap(),
                    None => g.clone(),
                };
                let new = rule
                    .update(lr, step, &a.as_tensor().detach(), &gs, &mut ba)
                    .unwrap();
                a.set(&new).unwrap();
                let done = rule.update_fused(lr, step, &b, &g, scale, &mut bb).unwrap();
                assert!(done, "{dtype:?}: the fused path did not run");
                assert_eq!(
                    bits(a.as_tensor()),
                    bits(b.as_tensor()),
                    "{:?} {dtype:?} scale {scale:?} step {step}: parameter",
                    rule.to_spec()
                );
                assert_eq!(ba.keys().collect::<Vec<_>>(), bb.keys().collect::<Vec<_>>());
                for (k, t) in &ba {
                    assert_eq!(
                        bits(t),
                        bits(&bb[k]),
                        "{:?} {dtype:?} scale {scale:?} step {step}: buffer {k}",
                        rule.to_spec()
                    );
                }
            }
        }
    }

    #[test]
    fn fused_updates_equal_the_tensor_expressions_bit_for_bit() {
        let rms = |momentum, centered, weight_decay| RmsPropConfig {
            lr: 1e-3,
            alpha: 0.95,
            eps: 1e-8,
            weight_decay,
            momentum,
            centered,
        };
        for dtype in [DType::F32, DType::F64] {
            for (m, c, wd) in [
                (0.9, true, 0.0),
                (0.0, false, 0.0),
                (0.9, false, 0.01),
                (0.0, true, 0.01),
            ] {
                same_as_expressions(&rms(m, c, wd), dtype);
            }
            // alpha 0.4: the lerp's weight 0.6 takes its other branch.
            same_as_expressions(
                &RmsPropConfig {
                    alpha: 0.4,
                    ..rms(0.5, true, 0.0)
                },
                dtype,
            );
            for (betas, wd, amsgrad) in [
                ((0.9, 0.999), 0.0, false),
                ((0.9, 0.95), 0.01, true),
                ((0.3, 0.9), 0.1, false),
            ] {
                let adam = AdamConfig {
                    lr: 1e-3,
                    betas,
                    eps: 1e-8,
                    weight_decay: wd,
                    amsgrad,
                };
                same_as_expressions(&adam, dtype);
                let adamw = AdamWConfig {
                    lr: 1e-3,
                    betas,
                    eps: 1e-8,
                    weight_decay: wd,
                    amsgrad,
                };
                same_as_expressions(&adamw, dtype);
            }
        }
    }

    #[test]
    fn fused_paths_decline_what_they_cannot_take() {
        let dev = Device::Cpu;
        let rule = RmsPropConfig::default();
        // A transposed (non-contiguous) gradient and a bf16 parameter: Ok(false), untouched.
        let p = Var::from_tensor(&Tensor::ones((3, 4), DType::F32, &dev).unwrap()).unwrap();
        let g = Tensor::ones((4, 3), DType::F32, &dev).unwrap().t().unwrap();
        let mut b = Buffers::new();
        assert!(!rule.update_fused(0.1, 1, &p, &g, None, &mut b).unwrap());
        assert!(b.is_empty());
        assert_eq!(
            p.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap(),
            12.0
        );
        let p16 = Var::from_tensor(&Tensor::ones(4, DType::BF16, &dev).unwrap()).unwrap();
        let g16 = Tensor::ones(4, DType::BF16, &dev).unwrap();
        assert!(!rule.update_fused(0.1, 1, &p16, &g16, None, &mut b).unwrap());
    }

    /// Three steps of `rule` (gradients zero, random, zero) from parameters that include +0
    /// and -0, once with +0 and once with -0 for the zero gradients, through the tensor
    /// expressions and (where the rule has it) the fused loop with and without a scale: the
    /// parameters must come out bit for bit the same, the buffers equal in value (a buffer may
    /// keep the zero's sign). This is what lets the vendored candle-core store a first gradient
    /// `g` as it is where upstream stored `0 + g`, which turned -0 into +0
    /// (vendor/README.md).
    fn zero_sign_is_irrelevant<R: UpdateRule>(rule: &R, dtype: DType) {
        let dev = Device::Cpu;
        let n = 4 * 1000;
        let p0 = Tensor::new(&[0.0f64, -0.0, 0.5, -0.25], &dev)
            .unwrap()
            .repeat(1000)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let pos = Tensor::zeros(n, dtype, &dev).unwrap();
        let neg = pos.neg().unwrap();
        assert!(bits(&neg).iter().all(|b| *b != 0), "-0 has its sign bit");
        let r = Tensor::randn(0f32, 1.0, n, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let run = |zero: &Tensor, fused: Option<Option<f64>>| {
            let v = Var::from_tensor(&p0).unwrap();
            let mut b = Buffers::new();
            let mut out = Vec::new();
            for (step, g) in [zero, &r, zero].into_iter().enumerate() {
                let (step, lr) = (step as u64 + 1, 1e-3);
                match fused {
                    None => {
                        let new = rule.update(lr, step, &v.as_tensor().detach(), g, &mut b);
                        v.set(&new.unwrap()).unwrap();
                    }
                    Some(scale) => {
                        assert!(rule.update_fused(lr, step, &v, g, scale, &mut b).unwrap())
                    }
                }
                let buffers: Vec<Vec<f64>> = b
                    .values()
                    .map(|t| t.to_dtype(DType::F64).unwrap().to_vec1().unwrap())
                    .collect();
                out.push((bits(v.as_tensor()), buffers));
            }
            out
        };
        let probe = Var::from_tensor(&p0).unwrap();
        let has_fused = rule
            .update_fused(0.0, 1, &probe, &pos, None, &mut Buffers::new())
            .unwrap();
        let mut paths = vec![None];
        if has_fused {
            paths.extend([Some(None), Some(Some(0.37))]);
        }
        for path in paths {
            let (a, b) = (run(&pos, path), run(&neg, path));
            for (step, (a, b)) in a.iter().zip(&b).enumerate() {
                let what = format!("{:?} {dtype:?} {path:?} step {}", rule.to_spec(), step + 1);
                assert_eq!(a.0, b.0, "{what}: parameters");
                assert_eq!(a.1, b.1, "{what}: buffers");
            }
        }
    }

    #[test]
    fn a_zero_gradients_sign_changes_no_update() {
        let rms = |momentum, centered, weight_decay| RmsPropConfig {
            lr: 1e-3,
            alpha: 0.95,
            eps: 1e-8,
            weight_decay,
            momentum,
            centered,
        };
        for dtype in [DType::F32, DType::F64] {
            for (m, c, wd) in [(0.9, true, 0.0), (0.0, false, 0.0), (0.9, false, 0.01)] {
                zero_sign_is_irrelevant(&rms(m, c, wd), dtype);
            }
            zero_sign_is_irrelevant(
                &RmsPropConfig {
                    alpha: 0.4,
                    ..rms(0.5, true, 0.01)
                },
                dtype,
            );
            for (betas, wd, amsgrad) in [((0.9, 0.999), 0.0, false), ((0.3, 0.9), 0.1, true)] {
                let adam = AdamConfig {
                    lr: 1e-3,
                    betas,
                    eps: 1e-8,
                    weight_decay: wd,
                    amsgrad,
                };
                zero_sign_is_irrelevant(&adam, dtype);
                let adamw = AdamWConfig {
                    lr: 1e-3,
                    betas,
                    eps: 1e-8,
                    weight_decay: wd,
                    amsgrad,
                };
                zero_sign_is_irrelevant(&adamw, dtype);
            }
            for (momentum, dampening, weight_decay, nesterov) in [
                (0.0, 0.0, 0.0, false),
                (0.9, 0.0, 0.0, false),
                (0.9, 0.1, 0.01, false),
                (0.9, 0.0, 0.01, true),
            ] {
                let sgd = SgdConfig {
                    lr: 1e-3,
                    momentum,
                    dampening,
                    weight_decay,
                    nesterov,
                };
                zero_sign_is_irrelevant(&sgd, dtype);
            }
            for (weight_decay, decoupled_weight_decay) in [(0.0, false), (0.1, false), (0.1, true)]
            {
                let lion = LionConfig {
                    lr: 1e-4,
                    betas: (0.9, 0.99),
                    weight_decay,
                    decoupled_weight_decay,
                };
                zero_sign_is_irrelevant(&lion, dtype);
            }
        }
    }

    #[test]
    fn ema_and_sum_of_squares_match_their_expressions() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let s = Tensor::randn(0f32, 1.0, 50_000, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let p = Tensor::randn(0f32, 1.0, 50_000, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let want = ((&s * 0.999).unwrap() + (&p * (1.0 - 0.999)).unwrap()).unwrap();
            let got = super::super::ema(&s, &p, 0.999).unwrap().unwrap();
            assert_eq!(bits(&want), bits(&got), "{dtype:?}");
            let squares = |t: &Tensor| -> f64 {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|v| v * v)
                    .sum()
            };
            let exact = squares(&s) + squares(&p);
            let fused = super::super::sum_squares(&[&s, &p])
                .unwrap()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                (fused - exact).abs() <= 1e-12 * exact,
                "{dtype:?}: {fused} vs {exact}"
            );
        }
        let t = Tensor::ones((3, 4), DType::F32, &dev).unwrap().t().unwrap();
        let ones = Tensor::ones(4, DType::F32, &dev).unwrap();
        assert!(super::super::sum_squares(&[&ones, &t]).unwrap().is_none());
        assert!(super::super::sum_squares(&[]).unwrap().is_none());
    }
}
