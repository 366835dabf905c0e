//! Shared helpers for the integration tests: the parity fixtures in `../shared/parity`.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// `../shared/parity/<name>` from the project root.
pub fn parity(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/parity")
        .join(name)
}

/// Every tensor of tiny16.safetensors.
pub fn tiny16() -> HashMap<String, Tensor> {
    fluxflow::checkpoint::read_tensors(&parity("tiny16.safetensors"))
        .expect("the parity fixture ../shared/parity/tiny16.safetensors")
}

/// ||a - b|| / ||b|| in float64; ||a - b|| itself where b is all zeros.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap();
    let d: f64 = diff.to_scalar().unwrap();
    let n: f64 = norm.to_scalar().unwrap();
    if n == 0.0 {
        d.sqrt()
    } else {
        (d / n).sqrt()
    }
}

/// Asserts rel_l2(actual, expected) < tol, naming the tensor.
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let err = rel_l2(actual, expected);
    assert!(
        err < tol,
        "{name}: relative L2 error {err:e} exceeds {tol:e}"
    );
}
