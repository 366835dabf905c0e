//! Attention in training keeps memory linear in the tokens (issue 8): the graph of a tracked
//! attention holds q, k, v and the output, not the score matrix, and its backward pass holds
//! one chunk of scores at a time. Measured with a counting allocator (this binary holds a
//! single test, so that nothing else allocates meanwhile), against candle's autograd of the
//! whole matrix as the control that shows what the measurement catches.

#[path = "common/alloc_count.rs"]
mod alloc_count;

use candle_core::{Device, Tensor, Var, D};
use fluxflow::kernels::attention::attention;

#[global_allocator]
static ALLOC: alloc_count::Counting = alloc_count::Counting;

const MIB: usize = 1 << 20;

/// Bytes the graph keeps after the forward pass, and the peak of the backward pass beyond them.
fn measure(
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    x: &[Var; 3],
    r: &Tensor,
) -> (usize, usize) {
    let before = alloc_count::in_use();
    let loss = (f(x[0].as_tensor(), x[1].as_tensor(), x[2].as_tensor()) * r)
        .unwrap()
        .sum_all()
        .unwrap();
    let kept = alloc_count::in_use().saturating_sub(before);
    let (grads, peak) = alloc_count::peak_during(|| loss.backward().unwrap());
    for v in x {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "a gradient for every input"
        );
    }
    (kept, peak)
}

#[test]
fn training_attention_keeps_no_score_matrix() {
    let dev = Device::Cpu;
    // 2 heads of 2048 tokens: each [B, H, S, S] score-sized tensor is 32 MiB in f32.
    let (b, h, s, dh) = (1, 2, 2048, 16);
    let x = [(); 3].map(|_| Var::randn(0f32, 1.0, (b, h, s, dh), &dev).unwrap());
    let r = Tensor::randn(0f32, 1.0, (b, h, s, dh), &dev).unwrap();
    // Chunks of 2^18 scores (1 MiB): 64 queries.
    let chunked = |q: &Tensor, k: &Tensor, v: &Tensor| attention(q, k, v, 0.25, 1 << 18).unwrap();
    let whole = |q: &Tensor, k: &Tensor, v: &Tensor| {
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.25).unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(v)
            .unwrap()
    };
    // Warm-up: thread pools and their scratch buffers are allocated once, outside the counts.
    measure(&chunked, &x, &r);
    let (kept, peak) = measure(&chunked, &x, &r);
    let (whole_kept, whole_peak) = measure(&whole, &x, &r);
    eprintln!(
        "chunked: kept {:.1} MiB, backward peak {:.1} MiB; whole matrix: {:.1} / {:.1} MiB",
        kept as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        whole_kept as f64 / MIB as f64,
        whole_peak as f64 / MIB as f64
    );
    // The control: the composition keeps score-sized tensors and its backward pass makes more.
    assert!(whole_kept >= 32 * MIB && whole_peak >= 32 * MIB);
    // The output and the gradients of q, k, v are 256 KiB each; a chunk's temporaries a few MiB.
    assert!(kept < 2 * MIB, "the graph keeps {kept} bytes");
    assert!(peak < 12 * MIB, "the backward pass peaks at {peak} bytes");
}
