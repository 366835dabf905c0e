//! Bounds on the numbers a user gives (configuration keys, flags, a checkpoint's `state.json`),
//! each where a larger value would exhaust memory, overflow a count, or mean nothing the
//! reference would ever use; and whether a hyper-parameter survives the conversion to the
//! dtype the training computes in.

use super::Precision;

/// The most steps a run may have (`training.max_steps`, `--max-steps`, `training.n_epochs`
/// times the steps per epoch, a checkpoint's step counts): 10^12, centuries of training at a
/// millisecond a step, far below where a step count overflows.
pub const MAX_STEPS: u64 = 1_000_000_000_000;

/// The most data loader threads (`training.workers`): each is an OS thread with its own
/// decoding buffers; the reference's DataLoader uses a handful.
pub const MAX_WORKERS: usize = 256;

/// The largest `model.baseline_width_mult`: a baseline's widths grow with it and its
/// parameters with its square (the parameter-matched value is about 3.7).
pub const MAX_WIDTH_MULT: f64 = 64.0;

/// The largest KL weight (`training.kl_beta`): the reference uses about 1e-4 to 1; above
/// 1000 the KL term swamps the reconstruction entirely.
pub const MAX_KL_BETA: f64 = 1000.0;

/// The largest model width (`model.vae_dim`, `feature_maps_dim`, `text_embedding_dim`,
/// `text_hidden`): the Phase 1 model's widths are 128 to 1024; parameters grow with the
/// square of a width.
pub const MAX_WIDTH: usize = 65536;

/// The most layers or heads of one kind (`model.vae_attn_layers`, `flow_layers`, heads).
pub const MAX_LAYERS: usize = 1024;

/// The most timed steps `bench --steps` runs.
pub const MAX_BENCH_STEPS: usize = 1_000_000;

/// Why `v` cannot be used as a float of `dtype`, if it cannot: beyond the dtype's range (it
/// becomes infinite), or a non-zero value that becomes 0 there. NaN and infinities are
/// refused where the value enters, before this.
pub fn dtype_problem(v: f64, dtype: Precision) -> Option<String> {
    match dtype {
        Precision::F64 => None,
        Precision::F32 => {
            let f = v as f32;
            if v.is_finite() && f.is_infinite() {
                Some(format!(
                    "beyond float32's range (at most {:e}), and training.dtype f32 computes \
                     with it in float32, where it is infinite",
                    f32::MAX
                ))
            } else if v != 0.0 && f == 0.0 {
                Some(format!(
                    "below float32's smallest number ({:e}), and training.dtype f32 computes \
                     with it in float32, where it is 0",
                    f32::from_bits(1)
                ))
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_in_their_dtype() {
        assert!(dtype_problem(1e39, Precision::F32).is_some());
        assert!(dtype_problem(-1e39, Precision::F32).is_some());
        assert!(dtype_problem(1e-50, Precision::F32).is_some());
        assert!(dtype_problem(1e39, Precision::F64).is_none());
        assert!(dtype_problem(1e-3, Precision::F32).is_none());
        assert!(dtype_problem(0.0, Precision::F32).is_none());
        assert!(dtype_problem(f32::MAX as f64, Precision::F32).is_none());
    }
}
