//! Whether a JPEG file is whole: its markers walked from the start-of-image marker to the
//! end-of-image marker (`FF D9`), with each scan's entropy-coded data skipped. The `image`
//! crate's decoder (zune-jpeg, lenient) fills whatever a cut-off file lacks with grey; a file
//! that ends before its end-of-image marker is refused here instead.

use anyhow::{bail, Result};

const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;
const TEM: u8 = 0x01;

/// Markers without a length field: SOI, EOI, TEM and the restart markers RST0-RST7.
fn standalone(marker: u8) -> bool {
    marker == SOI || marker == EOI || marker == TEM || (0xD0..=0xD7).contains(&marker)
}

/// Ok when the marker walk from the start reaches the end-of-image marker within `bytes`;
/// otherwise an error saying where the data stops (inside which segment or scan). Data after
/// the end-of-image marker (a trailer, a second image) is not examined. Bytes that are not a
/// marker between segments are skipped, as lenient decoders skip them.
pub fn check_complete(bytes: &[u8]) -> Result<()> {
    if bytes.len() < 2 || bytes[0] != 0xFF || bytes[1] != SOI {
        bail!("not a JPEG file: it does not start with the start-of-image marker (FF D8)");
    }
    let cut_off = |what: &str| -> Result<()> {
        bail!(
            "the JPEG data is cut off {what}: its {} bytes end without the end-of-image marker \
             (FF D9)",
            bytes.len()
        )
    };
    let mut pos = 2;
    let mut scans = 0usize;
    loop {
        // The next marker: FF (any number of fill FFs) then a code other than 00 and FF.
        while pos < bytes.len() && bytes[pos] != 0xFF {
            pos += 1;
        }
        while pos < bytes.len() && bytes[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else {
            return cut_off(if scans == 0 {
                "before its first scan"
            } else {
                "after its last scan"
            });
        };
        pos += 1;
        if marker == EOI {
            return Ok(());
        }
        if marker == 0x00 || standalone(marker) {
            continue;
        }
        let Some(len) = bytes
            .get(pos..pos + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        else {
            return cut_off(&format!(
                "in the length of a segment (marker FF {marker:02X})"
            ));
        };
        if len < 2 {
            bail!("malformed JPEG: segment FF {marker:02X} at byte {pos} gives a length of {len}");
        }
        if pos + len > bytes.len() {
            return cut_off(&format!(
                "inside a segment (marker FF {marker:02X} at byte {}, {len} bytes long)",
                pos - 2
            ));
        }
        pos += len;
        if marker == SOS {
            scans += 1;
            // Entropy-coded data: FF is followed by 00 (a stuffed FF) or a restart marker;
            // any other code is the next marker.
            loop {
                match bytes[pos..].iter().position(|&b| b == 0xFF) {
                    None => return cut_off(&format!("in scan {scans}")),
                    Some(i) => pos += i,
                }
                match bytes.get(pos + 1) {
                    None => return cut_off(&format!("in scan {scans}")),
                    Some(&0x00) => pos += 2,
                    Some(&m) if (0xD0..=0xD7).contains(&m) => pos += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg() -> Vec<u8> {
        let img = image::RgbImage::from_fn(40, 24, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 10) as u8, ((x * y) % 256) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_whole_jpeg_passes_and_every_cut_of_it_fails() {
        let bytes = jpeg();
        check_complete(&bytes).unwrap();
        let mut trailer = bytes.clone();
        trailer.extend_from_slice(b"trailing bytes after the image");
        check_complete(&trailer).unwrap();
        for n in 0..bytes.len() {
            let e = check_complete(&bytes[..n]);
            assert!(e.is_err(), "cut after {n} of {} bytes passed", bytes.len());
        }
        let e = check_complete(&bytes[..bytes.len() - 20])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cut off in scan 1") && e.contains("FF D9"),
            "{e}"
        );
    }

    #[test]
    fn a_progressive_style_stream_of_several_scans_is_walked_to_its_end() {
        // SOI, a 4-byte APP0, two scans whose data holds a stuffed FF and a restart marker, EOI.
        let mut b = vec![0xFF, SOI, 0xFF, 0xE0, 0x00, 0x04, 1, 2];
        for _ in 0..2 {
            b.extend_from_slice(&[0xFF, SOS, 0x00, 0x03, 9, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD3]);
            b.extend_from_slice(&[0x56]);
        }
        b.extend_from_slice(&[0xFF, EOI]);
        check_complete(&b).unwrap();
        let e = check_complete(&b[..b.len() - 2]).unwrap_err().to_string();
        assert!(e.contains("in scan 2"), "{e}");
        let e = check_complete(&b[..5]).unwrap_err().to_string();
        assert!(e.contains("segment"), "{e}");
        assert!(check_complete(b"\x89PNG").is_err());
    }
}
