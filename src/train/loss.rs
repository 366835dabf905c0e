//! The Phase 1 losses of fluxflow-training's `VAETrainer` (`_frequency_weighted_loss`,
//! `kl_standard_normal`) and `cosine_anneal_beta`.

use candle_core::{Result, Tensor};

/// F.avg_pool2d(x, 3, stride=1, padding=1) with zero padding counted (divide by 9 always).
/// [B, C, H, W] -> [B, C, H, W]
///
/// Separable sums of shifted copies: as a convolution each of the B x C planes was an image
/// with one channel, with three cuDNN passes per blur on CUDA (forward, input gradient and a
/// weight gradient of the constant kernel) on one-channel layouts.
pub fn box_blur3(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let sum3 = |t: &Tensor, dim: usize, n: usize| -> Result<Tensor> {
        let p = t.pad_with_zeros(dim, 1, 1)?;
        (p.narrow(dim, 0, n)? + p.narrow(dim, 1, n)?)? + p.narrow(dim, 2, n)?
    };
    sum3(&sum3(x, 3, w)?, 2, h)? / 9.0
}

/// Mean absolute difference.
pub fn l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.abs()?.mean_all()
}

/// Mean squared difference.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

/// L1 of the blurred images plus `alpha` x L1 of their high-frequency residues (x - blur x).
pub fn frequency_weighted_l1(pred: &Tensor, target: &Tensor, alpha: f64) -> Result<Tensor> {
    let pred_lf = box_blur3(pred)?;
    let target_lf = box_blur3(target)?;
    let loss_lf = l1(&pred_lf, &target_lf)?;
    let loss_hf = l1(&(pred - &pred_lf)?, &(target - &target_lf)?)?;
    loss_lf + (loss_hf * alpha)?
}

/// KL to N(0, 1) per element, `-0.5 (1 + logvar - mu^2 - exp(logvar))`, clamped below at
/// `free_bits` when it is positive (the clamped elements carry no gradient, as torch.clamp),
/// summed over C, H, W and averaged over the batch. Also returns the fraction of clamped
/// elements, as a float64 scalar on the device (read back with the step's other scalars).
pub fn kl_standard_normal(
    mu: &Tensor,
    logvar: &Tensor,
    free_bits: f64,
) -> Result<(Tensor, Tensor)> {
    let inner = ((logvar + 1.0)? - mu.sqr()?)?.sub(&logvar.exp()?)?;
    let kl = (inner * -0.5)?;
    let (kl, fraction) = if free_bits > 0.0 {
        let floor = Tensor::full(free_bits, kl.shape(), kl.device())?.to_dtype(kl.dtype())?;
        let keep = kl.ge(&floor)?;
        let kept = keep.to_dtype(candle_core::DType::F64)?.mean_all()?;
        (keep.where_cond(&kl, &floor)?, kept.affine(-1.0, 1.0)?)
    } else {
        (kl, Tensor::new(0f64, mu.device())?)
    };
    let b = kl.dim(0)?;
    let mean = (kl.flatten_from(1)?.sum(1)?.sum_all()? / b as f64)?;
    Ok((mean, fraction))
}

/// The KL weight at `step`: cosine warm-up from 0 to `beta_max` over `warmup_steps`.
pub fn kl_beta(step: u64, warmup_steps: u64, beta_max: f64) -> f64 {
    if warmup_steps == 0 {
        return beta_max;
    }
    let frac = (step as f64 / warmup_steps as f64).clamp(0.0, 1.0);
    beta_max * (1.0 - (std::f64::consts::PI * frac).cos()) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_beta_warms_up_along_a_cosine() {
        assert_eq!(kl_beta(0, 4, 2.0), 0.0);
        assert!((kl_beta(2, 4, 2.0) - 1.0).abs() < 1e-15);
        assert_eq!(kl_beta(4, 4, 2.0), 2.0);
        assert_eq!(kl_beta(9, 4, 2.0), 2.0);
        assert_eq!(kl_beta(3, 0, 0.5), 0.5);
    }

    #[test]
    fn box_blur_counts_zero_padding() {
        let x = Tensor::ones(
            (1, 1, 3, 3),
            candle_core::DType::F64,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let y: Vec<Vec<f64>> = box_blur3(&x)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!((y[0][0] - 4.0 / 9.0).abs() < 1e-15);
        assert!((y[0][1] - 6.0 / 9.0).abs() < 1e-15);
        assert!((y[1][1] - 1.0).abs() < 1e-15);
    }

    #[test]
    fn box_blur_and_its_gradient_equal_the_box_convolution() {
        use candle_core::{DType, Device, Var};
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 5, 7), &dev).unwrap()).unwrap();
        let k = (Tensor::ones((1, 1, 3, 3), DType::F64, &dev).unwrap() / 9.0).unwrap();
        let conv = x
            .reshape((6, 1, 5, 7))
            .unwrap()
            .conv2d(&k, 1, 1, 1, 1)
            .unwrap()
            .reshape((2, 3, 5, 7))
            .unwrap();
        let ours = box_blur3(&x).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f64 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&ours, &conv) < 1e-14);
        // A weighting that is not symmetric, so that a transposed gradient would show.
        let wgt = Tensor::randn(0f64, 1.0, (2, 3, 5, 7), &dev).unwrap();
        let g_ours = (&ours * &wgt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_conv = (&conv * &wgt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(diff(g_ours.get(&x).unwrap(), g_conv.get(&x).unwrap()) < 1e-14);
    }
}
