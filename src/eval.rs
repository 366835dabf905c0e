//! Reconstruction quality of a model on a folder of images: each image decoded to 8-bit RGB,
//! resized to its training size, encoded with the posterior mean and decoded with SPADE
//! context in batches of one size, written back to 8 bits as `reconstruct` does, and scored
//! with PSNR, SSIM and MS-SSIM (`crate::quality`). Used by `fluxflow eval` and by training's
//! periodic evaluation (`output.eval_data`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::data::scan::image_files;
use crate::data::BadFile;
use crate::image_io::{from_tensor, load_rgb, to_bucket_size, to_tensor, within_pixels};
use crate::model::{FluxModel, Noise};
use crate::quality::{measure, Planar, MS_SSIM_MIN_SIDE};

/// One decoded image at its training size.
pub struct EvalImage {
    /// The path relative to the evaluated folder.
    pub name: String,
    /// The full path.
    pub path: PathBuf,
    pub image: RgbImage,
    original: Planar,
}

impl EvalImage {
    /// This image as a skipped file whose reason is `why` (a refused memory check).
    fn unfit(&self, why: &anyhow::Error) -> BadFile {
        BadFile {
            path: self.path.clone(),
            reason: format!("{why:#}"),
        }
    }
}

/// An image that was scaled down to fit a pixel budget before its training size was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaled {
    pub name: String,
    /// Its size as decoded (upright).
    pub from: (u32, u32),
    /// The size it was scaled to; its training size is what is evaluated.
    pub to: (u32, u32),
}

/// The readable images of a folder and the files that were skipped.
pub struct EvalSet {
    pub images: Vec<EvalImage>,
    pub skipped: Vec<BadFile>,
    /// The images scaled down to `max_pixels` first.
    pub scaled: Vec<Scaled>,
}

impl EvalSet {
    /// Decodes up to `limit` images of `root` (recursively, sorted by path), each resized
    /// (Lanczos) to its training size after the `img_size` cap. With `max_pixels`, an image
    /// whose training size has more pixels is first scaled down until it has at most that
    /// many ([`within_pixels`]) and listed in `scaled`. An unreadable, truncated or empty
    /// file, or one that cannot fit `max_pixels`, is skipped and recorded with its reason;
    /// only the images kept count toward `limit`. Errors: a folder that cannot be listed or
    /// holds no usable image.
    pub fn load(
        root: &Path,
        limit: Option<usize>,
        img_size: Option<u32>,
        max_pixels: Option<u64>,
    ) -> Result<Self> {
        if !root.is_dir() {
            anyhow::bail!("{} is not a folder of images", root.display());
        }
        let (files, mut skipped) = image_files(root)?;
        let mut images = Vec::new();
        let mut scaled = Vec::new();
        for path in files {
            if limit.is_some_and(|n| images.len() >= n) {
                break;
            }
            let img = match load_rgb(&path) {
                Ok(img) => img,
                Err(e) => {
                    // The outer context repeats the path; the cause is the reason.
                    let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
                    let reason = if causes.is_empty() {
                        e.to_string()
                    } else {
                        causes.join(": ")
                    };
                    skipped.push(BadFile { path, reason });
                    continue;
                }
            };
            let name = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            let from = img.dimensions();
            let img = match max_pixels {
                None => img,
                Some(m) => match within_pixels(img, m) {
                    Ok((img, None)) => img,
                    Ok((img, Some(to))) => {
                        scaled.push(Scaled {
                            name: name.clone(),
                            from,
                            to,
                        });
                        img
                    }
                    Err(e) => {
                        skipped.push(BadFile {
                            path,
                            reason: format!("{e:#}"),
                        });
                        continue;
                    }
                },
            };
            let img = to_bucket_size(img, img_size);
            images.push(EvalImage {
                name,
                path,
                original: Planar::from_rgb8(&img),
                image: img,
            });
        }
        if images.is_empty() {
            let first = skipped
                .first()
                .map(|b| format!(" (first skipped: {}: {})", b.path.display(), b.reason))
                .unwrap_or_default();
            anyhow::bail!("no readable images in {}{first}", root.display());
        }
        Ok(Self {
            images,
            skipped,
            scaled,
        })
    }
}

/// One image's scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScore {
    pub name: String,
    pub width: u32,
    pub height: u32,
    /// dB; +infinity (null in JSON) for an exact reconstruction.
    pub psnr: Option<f64>,
    pub ssim: f64,
    /// None for images whose shorter side is under 161 pixels.
    pub ms_ssim: Option<f64>,
}

/// The averages over the evaluated images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Means {
    /// Mean of the finite per-image PSNRs (None when every reconstruction is exact).
    pub psnr: Option<f64>,
    pub ssim: f64,
    /// Mean over the images large enough for MS-SSIM; None when none is.
    pub ms_ssim: Option<f64>,
    pub images: usize,
    pub ms_ssim_images: usize,
}

/// Scores of a model on an [`EvalSet`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub images: Vec<ImageScore>,
    pub mean: Means,
}

impl Evaluation {
    /// A note for images too small for MS-SSIM's five scales, if any.
    pub fn ms_ssim_note(&self) -> Option<String> {
        let small = self.mean.images - self.mean.ms_ssim_images;
        (small > 0).then(|| {
            format!(
                "{small} of {} images have a shorter side under {MS_SSIM_MIN_SIDE} px, too small for \
                 MS-SSIM's five scales with an 11-px window: their MS-SSIM is left out (null)",
                self.mean.images
            )
        })
    }
}

/// Reconstructs every image of `set` (posterior mean, SPADE context; `batch` images of one
/// size per forward pass) with `model` in `dtype` on `device`, and scores each against its
/// original. A forward pass that cannot fit in memory ends the evaluation with the estimate.
pub fn evaluate(
    model: &FluxModel,
    set: &EvalSet,
    batch: usize,
    dtype: DType,
    device: &Device,
) -> Result<Evaluation> {
    Ok(score(model, set, batch, dtype, device, false)?.0)
}

/// As [`evaluate`], but a batch whose forward pass cannot fit in memory is retried an image at
/// a time, and an image that cannot fit alone is left out and returned with the estimate as
/// its reason, so that the others are still scored.
pub fn evaluate_fitting(
    model: &FluxModel,
    set: &EvalSet,
    batch: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Evaluation, Vec<BadFile>)> {
    score(model, set, batch, dtype, device, true)
}

fn score(
    model: &FluxModel,
    set: &EvalSet,
    batch: usize,
    dtype: DType,
    device: &Device,
    skip_unfit: bool,
) -> Result<(Evaluation, Vec<BadFile>)> {
    let mut by_size: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
    for (i, img) in set.images.iter().enumerate() {
        by_size.entry(img.image.dimensions()).or_default().push(i);
    }
    let fits = |chunk: &[usize]| {
        let (w, h) = set.images[chunk[0]].image.dimensions();
        crate::memory::check_fits(
            &format!(
                "reconstructing {} image(s) of {w}x{h} ({})",
                chunk.len(),
                set.images[chunk[0]].name
            ),
            crate::memory::activation_bytes(
                &model.config,
                chunk.len(),
                h as usize,
                w as usize,
                dtype,
                false,
            ),
            device,
        )
    };
    let mut scores: Vec<Option<ImageScore>> = vec![None; set.images.len()];
    let mut unfit = Vec::new();
    for idx in by_size.values() {
        for chunk in idx.chunks(batch.max(1)) {
            match fits(chunk) {
                Ok(()) => score_chunk(model, set, chunk, dtype, device, &mut scores)?,
                Err(e) if !skip_unfit => {
                    return Err(e.context("use a smaller --batch, or smaller images"))
                }
                Err(e) if chunk.len() == 1 => unfit.push(set.images[chunk[0]].unfit(&e)),
                Err(_) => {
                    for &i in chunk {
                        match fits(&[i]) {
                            Ok(()) => score_chunk(model, set, &[i], dtype, device, &mut scores)?,
                            Err(e) => unfit.push(set.images[i].unfit(&e)),
                        }
                    }
                }
            }
        }
    }
    let images: Vec<ImageScore> = scores.into_iter().flatten().collect();
    let mean_of = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let ms: Vec<f64> = images.iter().filter_map(|s| s.ms_ssim).collect();
    let mean = Means {
        psnr: mean_of(images.iter().filter_map(|s| s.psnr).collect()),
        ssim: mean_of(images.iter().map(|s| s.ssim).collect()).unwrap_or(f64::NAN),
        ms_ssim_images: ms.len(),
        ms_ssim: mean_of(ms),
        images: images.len(),
    };
    Ok((Evaluation { images, mean }, unfit))
}

/// Encodes, decodes and scores the images `chunk` of `set` (one size) as one batch.
fn score_chunk(
    model: &FluxModel,
    set: &EvalSet,
    chunk: &[usize],
    dtype: DType,
    device: &Device,
    scores: &mut [Option<ImageScore>],
) -> Result<()> {
    let xs = chunk
        .iter()
        .map(|&i| to_tensor(&set.images[i].image, dtype, device))
        .collect::<Result<Vec<_>>>()?;
    let x = Tensor::cat(&xs, 0)?;
    let names = || {
        chunk
            .iter()
            .map(|&i| set.images[i].name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let enc = model
        .compressor
        .forward(&x, Noise::Mean)
        .with_context(|| format!("cannot encode {}", names()))?;
    let y = model
        .expander
        .forward(&enc.packed, true)
        .with_context(|| format!("cannot decode {}", names()))?;
    for (k, &i) in chunk.iter().enumerate() {
        let img = &set.images[i];
        let recon = Planar::from_rgb8(&from_tensor(&y.get(k)?)?);
        let q =
            measure(&recon, &img.original).with_context(|| format!("cannot score {}", img.name))?;
        let (w, h) = img.image.dimensions();
        scores[i] = Some(ImageScore {
            name: img.name.clone(),
            width: w,
            height: h,
            psnr: q.psnr.is_finite().then_some(q.psnr),
            ssim: q.ssim,
            ms_ssim: q.ms_ssim,
        });
    }
    Ok(())
}
