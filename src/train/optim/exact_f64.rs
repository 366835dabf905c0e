//! Serde helpers (`#[serde(with = "exact_f64")]`) that store an `f64` bit-exactly in JSON.
//!
//! serde_json's default float parser (without its `float_roundtrip` feature) can be one ulp
//! off for numbers with 16+ significant digits, such as a learning rate after a few cosine
//! steps; resume must be bit-identical. Values are written as the shortest round-trip
//! decimal in a string (`"9.938503261272714e-4"`, `"inf"`), which Rust parses exactly; plain
//! JSON numbers are accepted too.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{value:e}"))
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    deserializer.deserialize_any(ExactF64)
}

struct ExactF64;

impl Visitor<'_> for ExactF64 {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number or a string holding a number")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        v.parse()
            .map_err(|_| E::custom(format!("invalid number string \"{v}\"")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }
}
