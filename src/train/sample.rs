//! Template reconstructions during training: each `output.test_image_address` image encoded
//! with the posterior mean and decoded with SPADE context, written as
//! `samples/<stem>/<step, 5 digits>.webp` (decoded from [-1, 1], not clipped to black), with
//! the colour ranges of the reconstruction for the metrics log.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde_json::{json, Map, Value};

use crate::image_io::{from_tensor, load_rgb, save_image, to_bucket_size, to_tensor};
use crate::model::{FluxModel, Noise};
use crate::quality::{psnr, Planar};

/// One template image, at its training size.
pub struct Template {
    pub stem: String,
    pub image: RgbImage,
    tensor: Tensor,
}

/// Loads the templates; an unreadable one is an error naming it and the key.
pub fn load_templates(
    paths: &[PathBuf],
    img_size: Option<u32>,
    dtype: DType,
    device: &Device,
) -> Result<Vec<Template>> {
    paths
        .iter()
        .map(|p| {
            let img = load_rgb(p)
                .with_context(|| format!("output.test_image_address: {}", p.display()))?;
            let img = to_bucket_size(img, img_size);
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "template".into());
            Ok(Template {
                tensor: to_tensor(&img, dtype, device)?,
                stem,
                image: img,
            })
        })
        .collect()
}

/// Reconstructs every template at `step`; returns
/// `{stem: {"r": [min, max, mean], "g": .., "b": .., "psnr": dB}}` (the PSNR of the written
/// 8-bit reconstruction against the template at its training size; null when exact).
pub fn write_samples(
    model: &FluxModel,
    templates: &[Template],
    samples_dir: &Path,
    step: u64,
) -> Result<Map<String, Value>> {
    let mut colours = Map::new();
    for t in templates {
        let dir = samples_dir.join(&t.stem);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let original = dir.join("original.png");
        if !original.exists() {
            save_image(&t.image, &original)?;
        }
        let enc = model.compressor.forward(&t.tensor, Noise::Mean)?;
        let y = model.expander.forward(&enc.packed, true)?.squeeze(0)?;
        let recon = from_tensor(&y)?;
        save_image(&recon, &dir.join(format!("{step:05}.webp")))?;
        let mut stats = Map::new();
        let db = psnr(&Planar::from_rgb8(&recon), &Planar::from_rgb8(&t.image))?;
        stats.insert("psnr".into(), json!(db.is_finite().then_some(db)));
        for (c, name) in ["r", "g", "b"].iter().enumerate() {
            let ch = y.get(c)?.flatten_all()?.to_dtype(DType::F64)?;
            let min: f64 = ch.min(0)?.to_scalar()?;
            let max: f64 = ch.max(0)?.to_scalar()?;
            let mean: f64 = ch.mean(0)?.to_scalar()?;
            stats.insert(name.to_string(), json!([min, max, mean]));
        }
        colours.insert(t.stem.clone(), Value::Object(stats));
    }
    Ok(colours)
}
