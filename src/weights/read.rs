//! Reads safetensors files with memory bounded by the file, never by what its header claims,
//! and refuses weights that are not finite.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// The longest safetensors header we read (the format's own limit: 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// A safetensors file opened with its header read.
struct Opened {
    file: fs::File,
    header: Vec<u8>,
    /// Where the data section starts, and its length.
    data_start: u64,
    data_len: u64,
}

fn not_safetensors(path: &Path, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "{} is not a valid safetensors file (truncated or another format): {why:#}",
        path.display()
    )
}

/// Opens a safetensors file and reads its header, whose claimed length is checked against the
/// file's size first (so a hostile length allocates nothing). Errors name the file.
fn open_safetensors(path: &Path) -> Result<Opened> {
    let mut file = crate::paths::open_regular(path)?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len == 0 {
        bail!(
            "{} is empty, not a safetensors weights file",
            path.display()
        );
    }
    if len < 8 {
        return Err(not_safetensors(
            path,
            format!("{len} bytes, fewer than its 8-byte header length"),
        ));
    }
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len - 8 {
        return Err(not_safetensors(
            path,
            format!(
                "its header claims {n} bytes, the file has {} after the length (at most \
                 {MAX_HEADER} are allowed)",
                len - 8
            ),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Opened {
        file,
        header,
        data_start: 8 + n,
        data_len: len - 8 - n,
    })
}

/// Every tensor of a safetensors file, on the CPU in its stored dtype. Errors name the file,
/// and the tensor where one is at fault.
///
/// Memory is bounded by the file, never by what its header claims: the header's length is
/// checked against the file's size before it is read, and every tensor's dtype, shape and byte
/// range against the data section before its bytes are read (one tensor at a time, so the peak
/// is the tensors returned plus one tensor's bytes). Only floating-point tensors are accepted (a
/// model, its optimizer moments and its EMA are never integers), and a name listed twice is an
/// error naming it.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    read_tensors_where(path, |_| true)
}

/// [`read_tensors`] of the tensors whose name `keep` accepts: the others are checked as part
/// of the file but neither read nor held to the dtype rule.
pub fn read_tensors_where(
    path: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let Opened {
        mut file,
        header,
        data_start,
        data_len,
    } = open_safetensors(path)?;
    let entries = parse_header(&header, data_len).map_err(|e| not_safetensors(path, e))?;
    let mut out = HashMap::with_capacity(entries.len());
    for e in entries.into_iter().filter(|e| keep(&e.name)) {
        let dtype = match e.dtype.as_str() {
            "F64" => DType::F64,
            "F32" => DType::F32,
            "BF16" => DType::BF16,
            "F16" => DType::F16,
            other => bail!(
                "{}: tensor {} is stored as {other}; FluxFlow weights files hold floating-point \
                 tensors only (F32, F64, BF16, F16)",
                path.display(),
                e.name
            ),
        };
        let mut bytes = vec![0u8; (e.end - e.begin) as usize];
        file.seek(SeekFrom::Start(data_start + e.begin))
            .and_then(|_| file.read_exact(&mut bytes))
            .with_context(|| format!("cannot read tensor {} of {}", e.name, path.display()))?;
        let t = Tensor::from_raw_buffer(&bytes, dtype, &e.shape, &Device::Cpu)
            .with_context(|| format!("cannot decode tensor {} of {}", e.name, path.display()))?;
        out.insert(e.name, t);
    }
    Ok(out)
}

/// One tensor of a safetensors header, checked: `begin..end` lies in the data section and holds
/// exactly `shape` of `dtype`.
struct HeaderEntry {
    name: String,
    /// The format's dtype name (`F32`, `I64`, ...).
    dtype: String,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

/// A JSON object's entries in file order, duplicates kept (serde's maps drop them silently).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = map.next_entry()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parses and checks a header against a data section of `data_len` bytes: the tensors in data
/// order, their ranges covering the section without gap or overlap.
fn parse_header(header: &[u8], data_len: u64) -> Result<Vec<HeaderEntry>> {
    let Entries(raw) = serde_json::from_slice(header).context("its header is not a JSON object")?;
    let mut seen = std::collections::HashSet::new();
    let mut entries = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if !seen.insert(name.clone()) {
            bail!("tensor {name} is listed twice in its header");
        }
        if name == "__metadata__" {
            continue;
        }
        let r: RawEntry = serde_json::from_value(value)
            .with_context(|| format!("tensor {name}: malformed header entry"))?;
        let size: u64 = match r.dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "BF16" | "F16" | "I16" | "U16" => 2,
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
            other => bail!("tensor {name}: unknown dtype {other}"),
        };
        let [begin, end] = r.data_offsets;
        let elements = r
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&e| e <= data_len)
            .ok_or_else(|| anyhow!("tensor {name}: shape {:?} is larger than the file", r.shape))?;
        if begin > end || end > data_len || end - begin != elements * size {
            bail!(
                "tensor {name}: bytes {begin}..{end} do not hold {:?} of {} within the {data_len} \
                 bytes of data",
                r.shape,
                r.dtype
            );
        }
        let shape = r.shape.iter().map(|&d| d as usize).collect();
        entries.push(HeaderEntry {
            name,
            dtype: r.dtype,
            shape,
            begin,
            end,
        });
    }
    entries.sort_by_key(|e| (e.begin, e.end));
    let mut at = 0;
    for e in &entries {
        if e.begin != at {
            bail!(
                "tensor {}: its bytes start at {} where the previous tensor's end at {at} (a gap \
                 or an overlap)",
                e.name,
                e.begin
            );
        }
        at = e.end;
    }
    if at != data_len {
        bail!("its tensors cover {at} of the {data_len} bytes of data");
    }
    Ok(entries)
}

/// A safetensors file's header as JSON (its `__metadata__` among the tensor entries), read
/// with the same bounds as the tensors.
pub fn read_header(path: &Path) -> Result<serde_json::Value> {
    serde_json::from_slice(&open_safetensors(path)?.header)
        .with_context(|| format!("{}: the safetensors header is not JSON", path.display()))
}

/// Refuses tensors holding NaN or infinity, naming the first such tensor (by name order) and
/// how many of its values are not finite: weights like that are damaged or come from a run
/// that diverged, and a model built from them computes nothing useful.
pub fn check_finite(tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        // 0 * x is 0 for every finite x and NaN for NaN and infinities.
        let probe = t
            .affine(0.0, 0.0)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if probe.is_finite() {
            continue;
        }
        let values = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        bail!(
            "{}: tensor {name} has {bad} non-finite values (NaN or infinity) of {}; the weights \
             are damaged or come from a run that diverged",
            source.display(),
            values.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(json: &str) -> Vec<u8> {
        json.as_bytes().to_vec()
    }

    #[test]
    fn a_header_must_cover_its_data_without_gap_or_overlap() {
        let ok = r#"{"__metadata__":{"format":"pt"},
            "a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
            "b":{"dtype":"F64","shape":[1],"data_offsets":[8,16]}}"#;
        let e = parse_header(&header(ok), 16).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!((e[1].name.as_str(), e[1].begin, e[1].end), ("b", 8, 16));
        for (bad, len, why) in [
            (ok, 24, "cover 16 of the 24"),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                    "b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
                "b",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
                "a",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                    "a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
                16,
                "listed twice",
            ),
        ] {
            let Err(e) = parse_header(&header(bad), len) else {
                panic!("{why}: accepted");
            };
            assert!(format!("{e:#}").contains(why), "{why}: {e:#}");
        }
    }
}
