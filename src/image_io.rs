//! Images in and out: decoding to RGB, resizing to a training size (`resize_rule`), conversion
//! to and from [-1, 1] tensors. (PSNR: `quality::psnr`.)

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, ImageFormat, RgbImage};

use crate::resize_rule::{bucket_size, training_size};

/// Decodes a PNG, JPEG or WebP file to 8-bit RGB (grey and RGBA are converted).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = crate::paths::read_regular(path)?;
    if bytes.is_empty() {
        bail!("{} is empty", path.display());
    }
    let img = image::load_from_memory(&bytes)
        .with_context(|| format!("{} is not a readable image", path.display()))?;
    Ok(img.to_rgb8())
}

/// Resizes with Lanczos to the training size unless the image already has it.
pub fn to_training_size(img: RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let (tw, th) = training_size(w, h);
    if (tw, th) == (w, h) {
        img
    } else {
        image::imageops::resize(&img, tw, th, FilterType::Lanczos3)
    }
}

/// The image resized (Lanczos) to its training size under the `data.img_size` cap, as the
/// data loader gives it (unchanged when it already has that size).
pub fn to_bucket_size(img: RgbImage, img_size: Option<u32>) -> RgbImage {
    let (w, h) = img.dimensions();
    let (tw, th) = bucket_size(w, h, img_size);
    if (tw, th) == (w, h) {
        img
    } else {
        image::imageops::resize(&img, tw, th, FilterType::Lanczos3)
    }
}

/// RGB image -> [1, 3, H, W] tensor in [-1, 1] (x / 127.5 - 1).
pub fn to_tensor(img: &RgbImage, dtype: DType, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let raw = img.as_raw();
    let mut data = vec![0f32; 3 * h * w];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = (px[c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// [3, H, W] tensor in [-1, 1] -> RGB image: clamp, then round((y + 1) * 127.5).
pub fn from_tensor(t: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        bail!("expected 3 channels to write an image, got {c}");
    }
    let v: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut out = RgbImage::new(w as u32, h as u32);
    for (i, px) in out.pixels_mut().enumerate() {
        for ch in 0..3 {
            let y = v[ch * h * w + i].clamp(-1.0, 1.0);
            px[ch] = ((y + 1.0) * 127.5).round() as u8;
        }
    }
    Ok(out)
}

/// Writes PNG or (lossless) WebP, chosen by the extension.
pub fn save_image(img: &RgbImage, path: &Path) -> Result<()> {
    let format = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("png") => ImageFormat::Png,
        Some("webp") => ImageFormat::WebP,
        _ => bail!(
            "cannot write {}: the output must end in .png or .webp",
            path.display()
        ),
    };
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, format)
        .map_err(|e| anyhow!("cannot encode {}: {e}", path.display()))?;
    crate::atomic_write::write_atomic(path, bytes.get_ref())
}
