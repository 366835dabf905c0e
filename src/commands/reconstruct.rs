//! `fluxflow reconstruct`: encode one image with the posterior mean (or a sampled latent),
//! decode it with SPADE context, write it and report the PSNR.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::parse_device;
use crate::cli::{Precision, ReconstructArgs};
use crate::image_io::{
    from_tensor, load_rgb, save_image, to_tensor, to_training_size, within_pixels,
};
use crate::model::Noise;
use crate::paths::refuse_overwrite;
use crate::quality::{psnr, Planar};
use crate::weights::{load_model, TEXT_FILE};

/// What a reconstruction produced.
#[derive(Debug)]
pub struct Report {
    pub output: PathBuf,
    pub input_size: (u32, u32),
    pub size: (u32, u32),
    pub psnr_db: f64,
    /// Set when the image's training size had more than `--max-pixels` pixels and it was
    /// scaled down first: its size after that (`size` is then at most `--max-pixels`).
    pub downscaled: Option<(u32, u32)>,
}

/// How far a reconstruction has got, reported to the caller as it goes (the forward pass of a
/// large image takes minutes on a CPU).
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    /// The image and the model are loaded; encoding starts at the training size `size`,
    /// `tokens` latent positions (the attention's cost grows with their square).
    Encoding { size: (u32, u32), tokens: usize },
    /// Encoding took this long; decoding starts.
    Decoding(Duration),
    /// Decoding took this long.
    Decoded(Duration),
}

/// Reconstructs `args.image`, calling `progress` at each [`Stage`].
pub fn run(args: &ReconstructArgs, progress: &mut dyn FnMut(&Stage)) -> Result<Report> {
    let device = parse_device(&args.device)?;
    let dtype = match args.dtype {
        Precision::F32 => DType::F32,
        Precision::F64 => DType::F64,
    };
    if args.max_pixels < 256 {
        bail!(
            "--max-pixels {}: must be at least 256 (16x16)",
            args.max_pixels
        );
    }
    let output = match &args.output {
        Some(p) => p.clone(),
        None => {
            let stem = args
                .image
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into());
            PathBuf::from(format!("{stem}.recon.png"))
        }
    };
    let text_file = args.checkpoint.with_file_name(TEXT_FILE);
    refuse_overwrite(
        "-o",
        &output,
        &[
            ("the image to reconstruct", &args.image),
            ("the checkpoint", &args.checkpoint),
            (
                "the text projection file read with the checkpoint",
                &text_file,
            ),
        ],
    )?;
    let original = load_rgb(&args.image)?;
    let input_size = original.dimensions();
    let (original, downscaled) = within_pixels(original, args.max_pixels)
        .with_context(|| format!("{}: --max-pixels {}", args.image.display(), args.max_pixels))?;
    let img = to_training_size(original);
    let model = load_model(&args.checkpoint, dtype, &device)?.model;
    let (w, h) = img.dimensions();
    crate::memory::check_fits(
        &format!("reconstructing {} at {w}x{h}", args.image.display()),
        crate::memory::activation_bytes(&model.config, 1, h as usize, w as usize, dtype, false),
        &device,
    )?;
    let x = to_tensor(&img, dtype, &device)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let noise = if args.sample {
        Noise::Sampled(&mut rng)
    } else {
        Noise::Mean
    };
    let down = 1usize << model.config.downscales.min(16);
    progress(&Stage::Encoding {
        size: (w, h),
        tokens: (w as usize / down).max(1) * (h as usize / down).max(1),
    });
    let t0 = Instant::now();
    let enc = model
        .compressor
        .forward(&x, noise)
        .with_context(|| format!("cannot encode {}", args.image.display()))?;
    device.synchronize()?;
    progress(&Stage::Decoding(t0.elapsed()));
    let t0 = Instant::now();
    let y = model
        .expander
        .forward(&enc.packed, true)
        .with_context(|| format!("cannot decode {}", args.image.display()))?;
    device.synchronize()?;
    progress(&Stage::Decoded(t0.elapsed()));
    let out_img = from_tensor(&y.squeeze(0)?)?;
    save_image(&out_img, &output)?;
    Ok(Report {
        output,
        input_size,
        size: img.dimensions(),
        psnr_db: psnr(&Planar::from_rgb8(&out_img), &Planar::from_rgb8(&img))?,
        downscaled,
    })
}
