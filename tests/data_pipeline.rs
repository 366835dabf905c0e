//! The data pipeline end to end: folder scan, bad files, the bucket cache, the seeded
//! resumable sampler, the parallel loader and the synthetic dataset.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fluxflow::data::{self, synthetic, BatchSampler, Loader, LoaderConfig, SamplerState};
use image::{Rgb, RgbImage};

/// A fresh, empty folder under the system temp dir, unique to this process and call, removed
/// when dropped.
struct Tmp(PathBuf);

impl std::ops::Deref for Tmp {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tmp(name: &str) -> Tmp {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fluxflow-data-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    Tmp(dir)
}

/// Writes a w x h image whose pixel (x, y) is `f(x, y)`; the format follows the extension.
fn write_image(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(w, h, |x, y| Rgb(f(x, y)))
        .save(path)
        .unwrap();
}

fn plain(path: &Path, w: u32, h: u32) {
    write_image(path, w, h, |x, y| [(x * 7) as u8, (y * 5) as u8, 90]);
}

fn names(bad: &[data::BadFile]) -> BTreeSet<String> {
    bad.iter()
        .map(|b| b.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn scan_finds_images_recursively_ignores_other_files_and_attaches_captions() {
    let root = tmp("recursive");
    plain(&root.join("a.png"), 32, 32);
    plain(&root.join("sub/b.JPG"), 48, 32);
    plain(&root.join("sub/deep/c.webp"), 16, 16);
    fs::write(root.join("notes.txt"), "not an image").unwrap();
    plain(&root.join("sub/d.png"), 16, 16); // a real image under an extension not taken
    fs::rename(root.join("sub/d.png"), root.join("sub/d.gif")).unwrap();
    fs::write(root.join("sub/e.png.bak"), "x").unwrap();
    let captions = root.join("captions.tsv");
    fs::write(
        &captions,
        "a.png\ta red thing\nsub/b.JPG\tnested\nmissing.png\tnone\n",
    )
    .unwrap();

    let ds = data::scan(&root, Some(&captions), None, &root.join("cache")).unwrap();
    let rels: Vec<_> = ds.entries.iter().map(|e| e.path.clone()).collect();
    assert_eq!(
        rels,
        ["a.png", "sub/b.JPG", "sub/deep/c.webp"].map(PathBuf::from)
    );
    let sizes: Vec<_> = ds.entries.iter().map(|e| (e.original, e.size)).collect();
    assert_eq!(
        sizes,
        [
            ((32, 32), (32, 32)),
            ((48, 32), (48, 32)),
            ((16, 16), (16, 16))
        ]
    );
    let caps: Vec<_> = ds.entries.iter().map(|e| e.caption.as_deref()).collect();
    assert_eq!(caps, [Some("a red thing"), Some("nested"), None]);
    assert_eq!(ds.unmatched_captions, 1);
    assert!(ds.bad.is_empty(), "{:?}", ds.bad);
    assert_eq!(ds.buckets().len(), 3);
}

#[test]
fn malformed_captions_line_is_an_error_naming_line_and_file() {
    let root = tmp("captions");
    plain(&root.join("a.png"), 16, 16);
    let captions = root.join("caps.txt");
    fs::write(&captions, "a.png\tok\n\nbroken line\n").unwrap();
    let err = format!(
        "{:#}",
        data::scan(&root, Some(&captions), None, &root.join("cache")).unwrap_err()
    );
    assert!(err.contains("line 3") && err.contains("caps.txt"), "{err}");
}

#[test]
fn truncated_empty_and_fake_images_are_skipped_and_named() {
    let root = tmp("bad");
    plain(&root.join("good.png"), 32, 16);
    plain(&root.join("whole.png"), 16, 16);
    let bytes = fs::read(root.join("whole.png")).unwrap();
    fs::write(root.join("truncated.png"), &bytes[..20]).unwrap();
    fs::remove_file(root.join("whole.png")).unwrap();
    fs::write(root.join("empty.jpg"), b"").unwrap();
    fs::write(root.join("text.png"), "just some text, renamed").unwrap();

    let ds = data::scan(&root, None, None, &root.join("cache")).unwrap();
    assert_eq!(ds.entries.len(), 1);
    assert_eq!(ds.entries[0].path, PathBuf::from("good.png"));
    assert_eq!(
        names(&ds.bad),
        ["empty.jpg", "text.png", "truncated.png"]
            .map(String::from)
            .into()
    );
    assert!(ds.bad.iter().all(|b| !b.reason.is_empty()));

    // The same answer from the cache.
    let again = data::scan(&root, None, None, &root.join("cache")).unwrap();
    assert!(again.from_cache);
    assert_eq!(again.bad, ds.bad);
}

#[test]
fn empty_missing_or_unusable_folders_are_errors_naming_the_folder() {
    let empty = tmp("empty");
    fs::write(empty.join("readme.txt"), "no images here").unwrap();
    let missing = empty.join("does-not-exist");
    let unusable = tmp("unusable");
    fs::write(unusable.join("x.png"), "text").unwrap();
    for dir in [&*empty, &*missing, &*unusable] {
        let err = format!(
            "{:#}",
            data::scan(dir, None, None, &empty.join("c")).unwrap_err()
        );
        assert!(err.contains("no images found in"), "{err}");
        assert!(err.contains(&dir.display().to_string()), "{err}");
    }
}

#[test]
fn img_size_caps_the_longer_side_before_the_training_rule() {
    let root = tmp("cap");
    plain(&root.join("big.png"), 640, 480);
    let ds = data::scan(&root, None, Some(64), &root.join("cache")).unwrap();
    assert_eq!(ds.entries[0].original, (640, 480));
    assert_eq!(ds.entries[0].size, (64, 48));
    let uncapped = data::scan(&root, None, None, &root.join("cache")).unwrap();
    assert_eq!(uncapped.entries[0].size, (640, 480));
    assert_ne!(uncapped.cache_file, ds.cache_file);

    let sampler = BatchSampler::new(&ds, 1, 0).unwrap();
    let mut loader = Loader::new(
        &ds,
        sampler,
        SamplerState::default(),
        LoaderConfig::default(),
    )
    .unwrap();
    let (batch, _) = loader.next().unwrap();
    assert_eq!(
        (batch.width, batch.height, batch.images.len()),
        (64, 48, 3 * 64 * 48)
    );
}

#[test]
fn bucket_cache_is_written_reused_and_rebuilt() {
    let root = tmp("cache");
    let cache_dir = root.join("out");
    plain(&root.join("data/a.png"), 32, 32);
    plain(&root.join("data/b.png"), 48, 32);
    let data_dir = root.join("data");

    let first = data::scan(&data_dir, None, None, &cache_dir).unwrap();
    assert!(!first.from_cache);
    let name = first
        .cache_file
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let hash = name.strip_suffix(".dimensions.json").unwrap();
    assert!(
        hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "{name}"
    );
    assert_eq!(first.cache_file.parent().unwrap(), cache_dir);

    // Reused: a size planted in the cache shows up, so no header was read.
    let mut json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&first.cache_file).unwrap()).unwrap();
    json["files"][0]["size"] = serde_json::json!([320, 240]);
    fs::write(&first.cache_file, serde_json::to_string(&json).unwrap()).unwrap();
    let second = data::scan(&data_dir, None, None, &cache_dir).unwrap();
    assert!(second.from_cache);
    assert_eq!(second.cache_file, first.cache_file);
    assert_eq!(second.entries[0].original, (320, 240));

    // A corrupt cache is rebuilt from the headers, not an error.
    fs::write(&first.cache_file, "{ not json").unwrap();
    let rebuilt = data::scan(&data_dir, None, None, &cache_dir).unwrap();
    assert!(!rebuilt.from_cache);
    assert_eq!(rebuilt.entries[0].original, (32, 32));
    assert!(
        data::scan(&data_dir, None, None, &cache_dir)
            .unwrap()
            .from_cache
    );

    // A changed file gives a new key and fresh sizes.
    plain(&data_dir.join("a.png"), 64, 16);
    let changed = data::scan(&data_dir, None, None, &cache_dir).unwrap();
    assert!(!changed.from_cache);
    assert_ne!(changed.cache_file, first.cache_file);
    assert_eq!(changed.entries[0].original, (64, 16));
    assert!(changed.cache_file.exists());
}

fn test_sampler(seed: u64) -> BatchSampler {
    let buckets = vec![(0..10).collect(), (10..15).collect(), vec![15]];
    BatchSampler::from_buckets(buckets, 3, seed).unwrap()
}

fn bucket_of(i: usize) -> usize {
    match i {
        0..10 => 0,
        10..15 => 1,
        _ => 2,
    }
}

#[test]
fn sampler_is_seeded_complete_and_homogeneous() {
    let s = test_sampler(42);
    assert_eq!(s.batches_per_epoch(), 4 + 2 + 1);
    assert_eq!(s.epoch_batches(0), test_sampler(42).epoch_batches(0));
    assert_ne!(s.epoch_batches(0), test_sampler(43).epoch_batches(0));
    assert_ne!(s.epoch_batches(0), s.epoch_batches(1));
    for epoch in 0..3 {
        let batches = s.epoch_batches(epoch);
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..16).collect::<Vec<_>>(), "epoch {epoch}");
        for b in &batches {
            assert!(!b.is_empty() && b.len() <= 3);
            assert!(b.iter().all(|&i| bucket_of(i) == bucket_of(b[0])), "{b:?}");
        }
    }
}

#[test]
fn sampler_resumes_mid_epoch_and_across_epoch_boundaries() {
    let mut uninterrupted = test_sampler(7);
    let mut states = vec![uninterrupted.state()];
    let mut order = Vec::new();
    for _ in 0..20 {
        order.push(uninterrupted.next_batch().unwrap());
        states.push(uninterrupted.state());
    }
    // Epoch 0 is the first 7 batches, then epoch 1, then epoch 2.
    assert_eq!(
        states[7],
        SamplerState {
            epoch: 0,
            position: 7
        }
    );
    assert_eq!(
        states[8],
        SamplerState {
            epoch: 1,
            position: 1
        }
    );
    assert_eq!(order[..7], test_sampler(7).epoch_batches(0)[..]);
    for k in [0, 3, 6, 7, 8, 13, 14, 19] {
        let saved: SamplerState =
            serde_json::from_str(&serde_json::to_string(&states[k]).unwrap()).unwrap();
        let mut resumed = test_sampler(7);
        resumed.restore(saved).unwrap();
        let rest: Vec<_> = (k..20).map(|_| resumed.next_batch().unwrap()).collect();
        assert_eq!(rest, order[k..], "resumed after batch {k}");
    }
}

/// A folder of 11 images in two sizes whose red channel encodes the index.
fn indexed_dataset(name: &str) -> (Tmp, data::Dataset) {
    let root = tmp(name);
    for i in 0..11u32 {
        let (w, h) = if i % 3 == 0 { (32, 16) } else { (16, 16) };
        write_image(&root.join(format!("img{i:02}.png")), w, h, move |x, y| {
            [(i * 20) as u8, (x * 8) as u8, (y * 15) as u8]
        });
    }
    let ds = data::scan(&root, None, None, &root.join("cache")).unwrap();
    (root, ds)
}

#[test]
fn loader_delivers_sampler_order_with_shapes_values_and_wait_times() {
    let (_root, ds) = indexed_dataset("loader");
    let sampler = BatchSampler::new(&ds, 2, 5).unwrap();
    let mut reference = sampler.clone();
    let config = LoaderConfig {
        workers: 3,
        prefetch: 2,
    };
    let mut loader = Loader::new(&ds, sampler.clone(), SamplerState::default(), config).unwrap();
    let mut waited = Duration::ZERO;
    let n = sampler.batches_per_epoch() + 3; // into the second epoch
    let mut delivered = Vec::new();
    for _ in 0..n {
        let (batch, wait) = loader.next().unwrap();
        waited += wait;
        let expected = reference.next_batch().unwrap();
        assert_eq!(batch.indices, expected);
        assert_eq!(batch.state_after(), reference.state());
        assert_eq!(loader.state(), reference.state());
        let (w, h) = ds.entries[expected[0]].size;
        assert_eq!((batch.width, batch.height), (w as usize, h as usize));
        assert_eq!(batch.batch_size, expected.len());
        assert_eq!(
            batch.images.len(),
            batch.batch_size * 3 * batch.width * batch.height
        );
        assert!(batch.images.iter().all(|v| (-1.0..=1.0).contains(v)));
        // Image 0 of the batch: red = index * 20, green at (x=1, y=0) = 8, blue at (0, 2) = 30.
        let plane = batch.width * batch.height;
        let i = expected[0] as f32;
        let at = |c: usize, x: usize, y: usize| batch.images[c * plane + y * batch.width + x];
        assert_eq!(at(0, 3, 3), (i * 20.0 / 255.0 - 0.5) / 0.5);
        assert_eq!(at(1, 1, 0), (8.0 / 255.0 - 0.5) / 0.5);
        assert_eq!(at(2, 0, 2), (30.0 / 255.0 - 0.5) / 0.5);
        assert_eq!(batch.paths[0], ds.root.join(&ds.entries[expected[0]].path));
        delivered.push(batch);
    }
    assert!(waited > Duration::ZERO && waited < Duration::from_secs(60));

    // A loader started from a saved mid-epoch state continues with the same batches.
    let k = 4;
    let mut resumed = Loader::new(&ds, sampler, delivered[k - 1].state_after(), config).unwrap();
    for b in &delivered[k..] {
        assert_eq!(resumed.next().unwrap().0.indices, b.indices);
    }
}

#[test]
fn loader_skips_files_broken_after_the_scan_and_names_them() {
    let (root, ds) = indexed_dataset("broken");
    let whole = fs::read(root.join("img04.png")).unwrap();
    fs::write(root.join("img04.png"), &whole[..whole.len() / 2]).unwrap();
    fs::remove_file(root.join("img07.png")).unwrap();

    let sampler = BatchSampler::new(&ds, 1, 1).unwrap();
    let n = sampler.batches_per_epoch();
    let mut loader = Loader::new(
        &ds,
        sampler,
        SamplerState::default(),
        LoaderConfig::default(),
    )
    .unwrap();
    let (mut images, mut empty, mut bad) = (0, 0, Vec::new());
    for _ in 0..n {
        let (batch, _) = loader.next().unwrap();
        images += batch.batch_size;
        if batch.is_empty() {
            empty += 1;
            assert_eq!(batch.images.len(), 0);
        }
        bad.extend(batch.bad);
    }
    assert_eq!((images, empty), (9, 2));
    assert_eq!(
        names(&bad),
        ["img04.png", "img07.png"].map(String::from).into()
    );
}

#[test]
fn dropping_the_loader_early_stops_its_threads() {
    let (root, ds) = indexed_dataset("drop");
    let config = LoaderConfig {
        workers: 2,
        prefetch: 1,
    };
    // On a thread, so that a deadlock fails the test at the limit instead of hanging it.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _root = root;
        let untouched = Loader::new(
            &ds,
            BatchSampler::new(&ds, 1, 0).unwrap(),
            SamplerState::default(),
            config,
        )
        .unwrap();
        drop(untouched);
        let mut loader = Loader::new(
            &ds,
            BatchSampler::new(&ds, 1, 0).unwrap(),
            SamplerState::default(),
            config,
        )
        .unwrap();
        loader.next().unwrap();
        std::thread::sleep(Duration::from_millis(50)); // let the workers fill the window
        drop(loader);
        let _ = done.send(());
    });
    assert!(
        finished.recv_timeout(Duration::from_secs(30)).is_ok(),
        "dropping the loaders did not return within 30 s"
    );
}

#[test]
fn synthetic_data_is_deterministic_and_has_two_buckets() {
    let root = tmp("synthetic");
    let a = synthetic::generate(&root.join("a"), 8, (32, 32), 11).unwrap();
    let b = synthetic::generate(&root.join("b"), 8, (32, 32), 11).unwrap();
    let c = synthetic::generate(&root.join("c"), 8, (32, 32), 12).unwrap();
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            fs::read(x).unwrap(),
            fs::read(y).unwrap(),
            "{}",
            x.display()
        );
    }
    assert!(a
        .iter()
        .zip(&c)
        .any(|(x, y)| fs::read(x).unwrap() != fs::read(y).unwrap()));

    let ds = data::scan(&root.join("a"), None, None, &root.join("cache")).unwrap();
    let counts: Vec<_> = ds
        .buckets()
        .into_iter()
        .map(|(s, v)| (s, v.len()))
        .collect();
    assert_eq!(counts, [((32, 32), 6), ((48, 32), 2)]);
}
