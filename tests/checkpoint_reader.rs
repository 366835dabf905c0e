//! The safetensors reader against hostile files: random truncations, bit flips in the header,
//! random header lengths. It never panics, and what it allocates is bounded by the file's size
//! (measured with a counting allocator; this binary holds a single test so that nothing else
//! allocates meanwhile).

#[path = "common/alloc_count.rs"]
mod alloc_count;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use fluxflow::weights::read_tensors;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[global_allocator]
static ALLOC: alloc_count::Counting = alloc_count::Counting;

/// Reads `path`, returning whether it parsed and the most memory allocated meanwhile beyond
/// what was allocated before.
fn read_measured(path: &Path) -> (bool, usize) {
    alloc_count::peak_during(|| read_tensors(path).is_ok())
}

/// A valid file of a few small tensors.
fn valid_file() -> Vec<u8> {
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    t.insert(
        "diffuser.a.weight".to_string(),
        Tensor::arange(0f32, 24., &dev)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap(),
    );
    t.insert(
        "diffuser.b.bias".to_string(),
        Tensor::arange(0f64, 5., &dev).unwrap(),
    );
    t.insert(
        "text_encoder.c".to_string(),
        Tensor::ones((3, 3), candle_core::DType::F32, &dev).unwrap(),
    );
    let dir = std::env::temp_dir().join(format!("fluxflow-reader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("valid.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    std::fs::read(&p).unwrap()
}

/// How a valid file is damaged.
#[derive(Debug, Clone)]
enum Damage {
    Truncate(usize),
    FlipHeaderBit(usize),
    HeaderLength(u64),
    FlipHeaderBits(Vec<usize>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        any::<usize>().prop_map(Damage::FlipHeaderBit),
        prop_oneof![
            any::<u64>(),
            0u64..4096,
            Just(u64::MAX),
            Just(u64::MAX - 7),
            Just(1u64 << 40)
        ]
        .prop_map(Damage::HeaderLength),
        prop::collection::vec(any::<usize>(), 2..8).prop_map(Damage::FlipHeaderBits),
    ]
}

fn apply(valid: &[u8], d: &Damage) -> Vec<u8> {
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    // Bits of the length field and the JSON header.
    let header_bits = (8 + header_len) * 8;
    let mut v = valid.to_vec();
    match d {
        Damage::Truncate(n) => v.truncate(n % valid.len()),
        Damage::FlipHeaderBit(b) => v[b % header_bits / 8] ^= 1 << (b % 8),
        Damage::FlipHeaderBits(bs) => {
            for b in bs {
                v[b % header_bits / 8] ^= 1 << (b % 8);
            }
        }
        Damage::HeaderLength(n) => v[..8].copy_from_slice(&n.to_le_bytes()),
    }
    v
}

#[test]
fn damaged_files_never_panic_and_allocate_at_most_a_few_times_their_size() {
    let valid = valid_file();
    let dir = std::env::temp_dir().join(format!("fluxflow-reader-{}", std::process::id()));
    let p = dir.join("damaged.safetensors");

    std::fs::write(&p, &valid).unwrap();
    let (ok, _) = read_measured(&p);
    assert!(ok, "the undamaged file reads");

    let mut runner = TestRunner::new(Config {
        cases: 2000,
        ..Config::default()
    });
    runner
        .run(&damage(), |d| {
            let bytes = apply(&valid, &d);
            std::fs::write(&p, &bytes).unwrap();
            let (_, peak) = read_measured(&p);
            // The header's JSON values, one tensor's bytes and its tensor: a small multiple of
            // the file, plus the fixed cost of a few small allocations.
            let bound = 16 * bytes.len() + 64 * 1024;
            prop_assert!(
                peak <= bound,
                "{d:?}: {peak} bytes allocated for {} bytes",
                bytes.len()
            );
            Ok(())
        })
        .unwrap();

    // A sparse 2 GiB file whose header claims its whole length: refused having read 8 bytes.
    let big = dir.join("big.safetensors");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    let mut head = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
    std::io::Write::write_all(&mut head, &((2u64 << 30) - 8).to_le_bytes()).unwrap();
    drop(head);
    let (ok, peak) = read_measured(&big);
    assert!(!ok);
    assert!(
        peak < 1 << 20,
        "{peak} bytes allocated for a refused header"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
