//! Reads and writes the reference's safetensors checkpoints: the model file (`diffuser.*`) and
//! the text projection file (`text_encoder.*`), float32 on disk whatever the training dtype.
//! Dimensions are detected from tensor shapes, as the reference's loader does.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::model::{Activation, FluxModel, ModelConfig, DIFFUSER, TEXT};
use crate::params::ParamStore;

/// File name of the text projection beside a model file (the reference's name).
pub const TEXT_FILE: &str = "text_encoder.safetensors";

/// Metadata keys of a baseline model file: its activation and width multiplier. A file without
/// them (the reference's, or ours with Bezier activations) is a Bezier model.
pub const ACTIVATION_KEY: &str = "fluxflow.activation";
pub const WIDTH_MULT_KEY: &str = "fluxflow.baseline_width_mult";

/// The activation and baseline width multiplier a model file records in its safetensors
/// metadata (Bezier and 1 when it records none). Reads the header only.
pub fn read_architecture(path: &Path) -> Result<(Activation, f64)> {
    let header: serde_json::Value = serde_json::from_slice(&open_safetensors(path)?.header)
        .with_context(|| format!("{}: the safetensors header is not JSON", path.display()))?;
    let meta = &header["__metadata__"];
    let activation = match meta[ACTIVATION_KEY].as_str() {
        None => return Ok((Activation::Bezier, 1.0)),
        Some(a) => a
            .parse::<Activation>()
            .with_context(|| format!("{}: metadata {ACTIVATION_KEY}", path.display()))?,
    };
    let mult = match meta[WIDTH_MULT_KEY].as_str() {
        None => 1.0,
        Some(m) => m
            .parse::<f64>()
            .ok()
            .filter(|m| m.is_finite() && *m > 0.0)
            .ok_or_else(|| {
                anyhow!(
                    "{}: metadata {WIDTH_MULT_KEY} is {m:?}, not a positive number",
                    path.display()
                )
            })?,
    };
    Ok((activation, mult))
}

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
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len == 0 {
        bail!("{} is empty, not a safetensors checkpoint", path.display());
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
                "{}: tensor {} is stored as {other}; a FluxFlow checkpoint holds floating-point \
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

fn dims<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> Option<&'a [usize]> {
    t.get(name).map(|x| x.dims())
}

fn count(t: &HashMap<String, Tensor>, prefix: &str, suffix: &str) -> usize {
    (0..)
        .take_while(|i| t.contains_key(&format!("{prefix}{i}{suffix}")))
        .count()
}

/// The model dimensions implied by a checkpoint's tensor shapes (the reference's
/// `_detect_config`). The compressor's head count is not recorded in a checkpoint; like the
/// reference, it is taken to be 8.
pub fn detect_config(t: &HashMap<String, Tensor>) -> Result<ModelConfig> {
    detect_config_as(t, Activation::Bezier, 1.0)
}

/// [`detect_config`] for a model file with the given activation and baseline width multiplier
/// (from [`read_architecture`]); a baseline's VAE dimension comes from its mu head.
pub fn detect_config_as(
    t: &HashMap<String, Tensor>,
    activation: Activation,
    baseline_width_mult: f64,
) -> Result<ModelConfig> {
    let mut cfg = ModelConfig {
        activation,
        baseline_width_mult,
        ..ModelConfig::default()
    };
    let latent = "diffuser.compressor.latent_proj.0.0.weight";
    let mu = "diffuser.compressor.mu_activation.p0";
    cfg.vae_dim = match (activation.is_bezier(), dims(t, latent), dims(t, mu)) {
        (true, Some([o, ..]), _) if o % 5 == 0 => o / 5,
        (true, Some(d), _) => {
            bail!("{latent} has shape {d:?}: its first dimension is not 5 x vae_dim")
        }
        (false, _, Some([d])) => *d,
        (false, _, _) => bail!("no {mu} of rank 1: cannot detect the {activation} VAE's dimension"),
        (true, None, _) => {
            bail!("no {latent}: cannot detect the VAE dimension (not a FluxFlow model file?)")
        }
    };
    cfg.downscales = count(t, "diffuser.compressor.encoder_z.", ".0.weight");
    cfg.upscales = count(t, "diffuser.expander.upscale.layers.", ".conv1.0.weight");
    cfg.vae_attn_layers = count(t, "diffuser.compressor.token_attn.", ".attn.in_proj_weight");
    let v2d = "diffuser.flow_processor.vae_to_dmodel.weight";
    cfg.flow_dim = match dims(t, v2d) {
        Some([o, _]) => *o,
        _ => bail!("no {v2d} of rank 2: cannot detect the flow dimension"),
    };
    cfg.flow_layers = count(
        t,
        "diffuser.flow_processor.transformer_blocks.",
        ".self_attn.q_proj.weight",
    );
    let inv = "diffuser.flow_processor.transformer_blocks.0.rotary_pe.inv_freq";
    if let Some([half]) = dims(t, inv) {
        if *half == 0 || !cfg.flow_dim.is_multiple_of(2 * half) {
            bail!(
                "{inv} has {half} entries, which does not divide flow_dim {}",
                cfg.flow_dim
            );
        }
        cfg.flow_heads = cfg.flow_dim / (2 * half);
    }
    if let Some([_, e]) = dims(t, "diffuser.flow_processor.text_proj.weight") {
        cfg.text_embedding_dim = *e;
    }
    if let Some([_, h]) = dims(t, "text_encoder.ouput_layer.0.weight") {
        cfg.text_hidden = *h;
    }
    cfg.validate()?;
    Ok(cfg)
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

/// The prefix of the DistilBERT backbone a reference run saves in its text encoder file; the
/// model does not use it (flow training is not supported), so it is not read.
pub const TEXT_BACKBONE: &str = "text_encoder.language_model.";

fn not_backbone(name: &str) -> bool {
    !name.starts_with(TEXT_BACKBONE)
}

/// A model loaded from a checkpoint, and where its text projection came from.
pub struct Loaded {
    pub model: FluxModel,
    /// The file the text projection was read from; `None` when it was freshly initialised.
    pub text_source: Option<PathBuf>,
}

/// Loads a model file (and its text projection: from the same file if it holds
/// `text_encoder.*`, else from `text_encoder.safetensors` beside it, else fresh). Every
/// `diffuser.*` tensor must be there with the right shape and no other `diffuser.*` tensor may
/// be; tensors under other prefixes, and the reference's text backbone ([`TEXT_BACKBONE`],
/// never read), are ignored. Non-finite weights are refused ([`check_finite`]).
pub fn load_model(path: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    let mut tensors = read_tensors_where(path, not_backbone)?;
    check_finite(&tensors, path)?;
    let mut text_source = None;
    if tensors.keys().any(|k| k.starts_with(TEXT)) {
        text_source = Some(path.to_path_buf());
    } else {
        let beside = path.with_file_name(TEXT_FILE);
        if beside.is_file() && beside != path {
            let text = read_tensors_where(&beside, not_backbone)?;
            check_finite(&text, &beside)?;
            for (k, v) in text {
                if k.starts_with(TEXT) {
                    tensors.insert(k, v);
                }
            }
            text_source = Some(beside);
        }
    }
    let (activation, mult) = read_architecture(path)?;
    let cfg = detect_config_as(&tensors, activation, mult)
        .with_context(|| format!("cannot detect the model dimensions of {}", path.display()))?;
    let fresh: Vec<String> = match text_source {
        Some(_) => vec![],
        None => vec![TEXT.to_string()],
    };
    let store = ParamStore::loaded(tensors, fresh, dtype, device);
    let model = FluxModel::build(&cfg, store.clone())
        .with_context(|| format!("cannot build the model of {}", path.display()))?;
    store
        .check_complete(&[DIFFUSER, TEXT])
        .with_context(|| format!("{} does not match a FluxFlow model", path.display()))?;
    Ok(Loaded { model, text_source })
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync of
/// the folder. A failure leaves any previous `path` intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| -> Result<()> {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("cannot flush {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        if let Ok(d) = fs::File::open(&dir) {
            // Makes the rename durable; some filesystems refuse fsync on folders.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Serialises tensors (converted to float32, CPU, contiguous) in safetensors format.
pub fn to_safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    serialize(tensors, Some(DType::F32), &[])
}

/// The model file's bytes (`diffuser.*`, float32); a baseline's records its activation and
/// width multiplier in the metadata, a Bezier model's is exactly the reference's format.
pub fn model_file_bytes(model: &FluxModel) -> Result<Vec<u8>> {
    let c = &model.config;
    let meta = if c.activation.is_bezier() {
        vec![]
    } else {
        vec![
            (ACTIVATION_KEY.to_string(), c.activation.to_string()),
            (
                WIDTH_MULT_KEY.to_string(),
                c.baseline_width_mult.to_string(),
            ),
        ]
    };
    serialize(&model.params.tensors(DIFFUSER), Some(DType::F32), &meta)
}

/// Serialises tensors in safetensors format, each in its own dtype (for exact resume state).
pub fn to_safetensors_bytes_exact(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    serialize(tensors, None, &[])
}

fn serialize(
    tensors: &[(String, Tensor)],
    dtype: Option<DType>,
    extra_meta: &[(String, String)],
) -> Result<Vec<u8>> {
    let converted = tensors
        .iter()
        .map(|(k, t)| {
            let t = t.to_device(&Device::Cpu)?;
            let t = match dtype {
                Some(d) => t.to_dtype(d)?,
                None => t,
            };
            Ok((k.clone(), t.contiguous()?))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    meta.extend(extra_meta.iter().cloned());
    let views = converted
        .iter()
        .map(|(k, t)| Ok((k.as_str(), cpu_view(t)?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(meta)).map_err(|e| anyhow!("cannot serialise tensors: {e}"))
}

/// A contiguous CPU tensor's bytes, borrowed from its storage: candle's own `View` copies each
/// tensor into a vector first, so serialising through it copies every checkpoint twice.
struct CpuView<'a, G> {
    /// The storage's read guard (candle's lock type), held while the bytes are borrowed.
    storage: G,
    /// First element and element count within the storage.
    start: usize,
    len: usize,
    tensor: &'a Tensor,
}

fn cpu_view(
    t: &Tensor,
) -> Result<CpuView<'_, impl std::ops::Deref<Target = candle_core::Storage> + '_>> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("internal: a tensor to serialise is not contiguous");
    };
    if !matches!(&*storage, candle_core::Storage::Cpu(_)) {
        bail!("internal: a tensor to serialise is not on the CPU");
    }
    Ok(CpuView {
        storage,
        start,
        len: end - start,
        tensor: t,
    })
}

/// The bytes of `v[start..start + len]`.
fn bytes_of<T: Copy>(v: &[T], start: usize, len: usize) -> &[u8] {
    let v = &v[start..start + len];
    // SAFETY: `v` is valid for reads of `size_of_val(v)` bytes for the returned lifetime (the
    // result borrows `v`, so nothing can write it meanwhile). The only callers (`data` below)
    // pass u8, u32, i16, i32, i64, bf16, f16 (both repr(transparent) over u16), f32 and f64
    // slices: types without padding, so every byte is initialised; u8 needs no alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> safetensors::View for CpuView<'_, G> {
    fn dtype(&self) -> safetensors::Dtype {
        self.tensor.dtype().into()
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        use candle_core::CpuStorage as C;
        let (s, n) = (self.start, self.len);
        let bytes = match &*self.storage {
            candle_core::Storage::Cpu(c) => match c {
                C::U8(v) => bytes_of(v, s, n),
                C::U32(v) => bytes_of(v, s, n),
                C::I16(v) => bytes_of(v, s, n),
                C::I32(v) => bytes_of(v, s, n),
                C::I64(v) => bytes_of(v, s, n),
                C::BF16(v) => bytes_of(v, s, n),
                C::F16(v) => bytes_of(v, s, n),
                C::F32(v) => bytes_of(v, s, n),
                C::F64(v) => bytes_of(v, s, n),
                // Types a checkpoint never holds: candle's own copy.
                _ => return safetensors::View::data(&self.tensor),
            },
            _ => return safetensors::View::data(&self.tensor),
        };
        std::borrow::Cow::Borrowed(bytes)
    }

    fn data_len(&self) -> usize {
        self.len * self.tensor.dtype().size_in_bytes()
    }
}

/// Saves the model file (`diffuser.*`) at `model_path` and the text projection as
/// `text_encoder.safetensors` beside it, both atomically, float32.
pub fn save_model(model: &FluxModel, model_path: &Path) -> Result<()> {
    write_atomic(model_path, &model_file_bytes(model)?)?;
    let text = to_safetensors_bytes(&model.params.tensors(TEXT))?;
    write_atomic(&model_path.with_file_name(TEXT_FILE), &text)
}
