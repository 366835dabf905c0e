//! Images in and out: decoding to RGB, resizing to a training size (`resize_rule`), conversion
//! to and from [-1, 1] tensors. (PSNR: `quality::psnr`.)

mod jpeg;

use std::io::Cursor;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::metadata::Orientation;
use image::{
    imageops::FilterType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage,
};

use crate::resize_rule::{bucket_size, fit_within, training_size};

/// Decodes a PNG, JPEG or WebP file to 8-bit RGB (grey and RGBA are converted), turned upright
/// by its EXIF orientation if it records one. A JPEG cut off before its end-of-image marker is
/// an error, as a cut-off PNG or WebP is (the JPEG decoder would fill the missing part grey).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = crate::paths::read_regular(path)?;
    if bytes.is_empty() {
        bail!("{} is empty", path.display());
    }
    decode_upright(&bytes).with_context(|| format!("{} is not a readable image", path.display()))
}

/// The image in `bytes` decoded and turned upright; see [`load_rgb`].
fn decode_upright(bytes: &[u8]) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    if reader.format() == Some(ImageFormat::Jpeg) {
        jpeg::check_complete(bytes)?;
    }
    let mut decoder = reader.into_decoder()?;
    // The allocation cap `image::load_from_memory` applies (512 MiB by default).
    Limits::default().reserve(decoder.total_bytes())?;
    // An unreadable EXIF block leaves the image as stored.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

/// Whether an EXIF orientation turns the stored image by 90 or 270 degrees, so that its upright
/// width is the stored height.
pub fn swaps_sides(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// An image file's upright size (its EXIF orientation applied) from its header, without
/// decoding the pixels. A JPEG is read whole (the decoder reads it whole anyway) and must end
/// with its end-of-image marker; PNG and WebP are read only up to their header.
pub fn upright_size(path: &Path) -> Result<(u32, u32)> {
    let reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .context("cannot open")?;
    let (w, h, orientation) = if reader.format() == Some(ImageFormat::Jpeg) {
        let bytes = std::fs::read(path).context("cannot read")?;
        jpeg::check_complete(&bytes)?;
        let reader = ImageReader::new(Cursor::new(&bytes[..])).with_guessed_format()?;
        header_of(reader)?
    } else {
        header_of(reader)?
    };
    Ok(if swaps_sides(orientation) {
        (h, w)
    } else {
        (w, h)
    })
}

fn header_of<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
) -> Result<(u32, u32, Orientation)> {
    let mut decoder = reader.into_decoder().context("unreadable image header")?;
    let (w, h) = decoder.dimensions();
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    Ok((w, h, orientation))
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

/// The image scaled down (Lanczos, aspect ratio kept) so that its training size has at most
/// `max_pixels` pixels ([`fit_within`]), and its new size if it was. An error gives the sizes
/// when even its smallest training size with the aspect ratio kept has more pixels.
pub fn within_pixels(img: RgbImage, max_pixels: u64) -> Result<(RgbImage, Option<(u32, u32)>)> {
    let (w, h) = img.dimensions();
    match fit_within(w, h, max_pixels) {
        Ok(None) => Ok((img, None)),
        Ok(Some((nw, nh))) => Ok((
            image::imageops::resize(&img, nw, nh, FilterType::Lanczos3),
            Some((nw, nh)),
        )),
        Err((tw, th)) => {
            let least = tw as u64 * th as u64;
            bail!(
                "{w}x{h} cannot be scaled down to {max_pixels} pixels: with its aspect ratio \
                 kept, its smallest training size (16 pixels on the shorter side, both sides \
                 multiples of 16) is {tw}x{th}, {least} pixels; allow at least {least}"
            )
        }
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
