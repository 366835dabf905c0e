//! Scanning a data folder at COCO scale: N image files (default 100,000 PNGs of eight sizes in
//! 100 subfolders, written once under the temp folder), scanned cold (every header read, in
//! parallel, and the bucket table cached) and then again from the cache. Prints both times.
//!
//! `cargo bench --bench scan [-- FILES]`

use std::path::Path;
use std::time::Instant;

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 3]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn main() -> anyhow::Result<()> {
    let files: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let root = std::env::temp_dir().join(format!("fluxflow-scan-bench-{files}"));
    let data = root.join("data");
    let marker = root.join("complete");
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&root);
        let sizes = [
            (640, 480),
            (480, 640),
            (640, 427),
            (500, 375),
            (427, 640),
            (612, 612),
            (640, 360),
            (333, 500),
        ];
        let blobs: Vec<Vec<u8>> = sizes.iter().map(|&(w, h)| png(w, h)).collect();
        let t = Instant::now();
        for i in 0..files {
            let dir = data.join(format!("{:03}", i % 100));
            if i < 100 {
                std::fs::create_dir_all(&dir)?;
            }
            std::fs::write(dir.join(format!("{i:07}.png")), &blobs[i % blobs.len()])?;
        }
        std::fs::write(&marker, b"")?;
        println!("wrote {files} files in {:.1} s", t.elapsed().as_secs_f64());
    }
    let cache = root.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache)?;
    let scan = |label: &str, cache: &Path| -> anyhow::Result<()> {
        let t = Instant::now();
        let ds = fluxflow::data::scan(&data, None, Some(512), cache)?;
        println!(
            "{label}: {} images, {} buckets, from cache: {}, {:.3} s",
            ds.len(),
            ds.buckets().len(),
            ds.from_cache,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    };
    scan("cold scan  ", &cache)?;
    scan("cached scan", &cache)?;
    Ok(())
}
