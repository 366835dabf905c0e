//! Parameter store: creates every model tensor once under its reference name, either freshly
//! initialised (PyTorch's or the reference's initialisation, from a seeded RNG) or taken from a
//! loaded checkpoint, and reports missing, mis-shaped and unexpected tensors by name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// How a freshly created tensor is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Every element equal to the value.
    Const(f64),
    /// Uniform in [-bound, bound).
    Uniform(f64),
    /// Normal with mean 0 and the given standard deviation.
    Normal(f64),
}

enum Source {
    Fresh(StdRng),
    /// Tensors from a file; names under one of the prefixes are created fresh instead.
    Loaded(HashMap<String, Tensor>, Vec<String>, StdRng),
    /// Shapes only: every tensor is a broadcast zero and nothing is allocated (for counting
    /// the parameters of a configuration).
    Shapes,
}

struct Inner {
    source: Source,
    vars: BTreeMap<String, Var>,
    buffers: BTreeSet<String>,
    missing: Vec<String>,
    misshaped: Vec<String>,
    /// Element counts of a [`Source::Shapes`] store's trainable parameters.
    counted: BTreeMap<String, usize>,
}

/// Every tensor of a model, by reference name. Cheap to clone (shared).
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    dtype: DType,
    device: Device,
}

impl ParamStore {
    /// A store whose tensors are initialised from an RNG seeded with `seed`.
    pub fn fresh(dtype: DType, device: &Device, seed: u64) -> Self {
        Self::new(Source::Fresh(StdRng::seed_from_u64(seed)), dtype, device)
    }

    /// A store that only records shapes: its tensors are broadcast zeros (never to be trained
    /// or written), for [`ParamStore::parameter_count`] without allocating the model.
    pub fn shapes(dtype: DType, device: &Device) -> Self {
        Self::new(Source::Shapes, dtype, device)
    }

    /// The number of trainable elements (buffers excluded) under `prefix`.
    pub fn parameter_count(&self, prefix: &str) -> usize {
        let inner = self.lock();
        let vars: usize = inner
            .vars
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && !inner.buffers.contains(*k))
            .map(|(_, v)| v.elem_count())
            .sum();
        let counted: usize = inner
            .counted
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, n)| n)
            .sum();
        vars + counted
    }

    /// A store whose tensors come from `tensors` (any float dtype, converted to `dtype`),
    /// except those under `fresh_prefixes`, which are initialised as in [`ParamStore::fresh`]
    /// with seed 0.
    pub fn loaded(
        tensors: HashMap<String, Tensor>,
        fresh_prefixes: Vec<String>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let source = Source::Loaded(tensors, fresh_prefixes, StdRng::seed_from_u64(0));
        Self::new(source, dtype, device)
    }

    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        let inner = Inner {
            source,
            vars: BTreeMap::new(),
            buffers: BTreeSet::new(),
            missing: Vec::new(),
            misshaped: Vec::new(),
            counted: BTreeMap::new(),
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
            dtype,
            device: device.clone(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The root path; `pp` descends like PyTorch attribute names.
    pub fn root(&self) -> Pb {
        Pb {
            store: self.clone(),
            prefix: String::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After building a model from a loaded store: an error naming every tensor that was missing
    /// or had the wrong shape, and every loaded tensor under one of `owned_prefixes` that the
    /// model did not use.
    pub fn check_complete(&self, owned_prefixes: &[&str]) -> Result<()> {
        let inner = self.lock();
        let Source::Loaded(tensors, ..) = &inner.source else {
            return Ok(());
        };
        let mut unexpected: Vec<&String> = tensors
            .keys()
            .filter(|k| owned_prefixes.iter().any(|p| k.starts_with(p)))
            .filter(|k| !inner.vars.contains_key(*k))
            .collect();
        unexpected.sort();
        let mut msg = Vec::new();
        if !inner.missing.is_empty() {
            msg.push(format!(
                "missing tensors ({}): {}",
                inner.missing.len(),
                list(&inner.missing)
            ));
        }
        if !inner.misshaped.is_empty() {
            msg.push(format!(
                "tensors with the wrong shape ({}): {}",
                inner.misshaped.len(),
                list(&inner.misshaped)
            ));
        }
        if !unexpected.is_empty() {
            msg.push(format!(
                "unexpected tensors ({}): {}",
                unexpected.len(),
                list(&unexpected)
            ));
        }
        if msg.is_empty() {
            Ok(())
        } else {
            bail!("{}", msg.join("; "))
        }
    }

    /// Trainable parameters (buffers excluded) whose names start with `prefix`, in name order.
    pub fn trainable(&self, prefix: &str) -> Vec<(String, Var)> {
        let inner = self.lock();
        inner
            .vars
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && !inner.buffers.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every tensor (parameters and persistent buffers) whose name starts with `prefix`.
    pub fn tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let inner = self.lock();
        inner
            .vars
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Whether `name` is a buffer (saved, never trained).
    pub fn is_buffer(&self, name: &str) -> bool {
        self.lock().buffers.contains(name)
    }

    fn create(&self, name: String, shape: &[usize], fill: Fill) -> candle_core::Result<Tensor> {
        let mut inner = self.lock();
        if inner.vars.contains_key(&name) || inner.counted.contains_key(&name) {
            candle_core::bail!("tensor {name} created twice: two layers share one name");
        }
        if let Source::Shapes = inner.source {
            if !matches!(fill, Fill::Values(_)) {
                inner.counted.insert(name, shape.iter().product());
            }
            return Tensor::zeros((), self.dtype, &self.device)?.broadcast_as(shape);
        }
        let inner_ref = &mut *inner;
        let tensor = match &mut inner_ref.source {
            Source::Loaded(_, fresh, rng) if fresh.iter().any(|p| name.starts_with(p)) => {
                self.fill(rng, shape, &fill)?
            }
            Source::Loaded(tensors, ..) => match tensors.get(&name) {
                Some(t) if t.dims() == shape => t.to_dtype(self.dtype)?.to_device(&self.device)?,
                Some(t) => {
                    let msg = format!("{name} (expected {shape:?}, found {:?})", t.dims());
                    inner_ref.misshaped.push(msg);
                    Tensor::zeros(shape, self.dtype, &self.device)?
                }
                None => {
                    inner_ref.missing.push(name.clone());
                    Tensor::zeros(shape, self.dtype, &self.device)?
                }
            },
            Source::Fresh(rng) => self.fill(rng, shape, &fill)?,
            // Returned early above; kept total without a panic.
            Source::Shapes => Tensor::zeros(shape, self.dtype, &self.device)?,
        };
        let is_buffer = matches!(fill, Fill::Values(_));
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        if is_buffer {
            inner.buffers.insert(name.clone());
        }
        inner.vars.insert(name, var);
        Ok(out)
    }
}

impl ParamStore {
    fn fill(&self, rng: &mut StdRng, shape: &[usize], fill: &Fill) -> candle_core::Result<Tensor> {
        let numel: usize = shape.iter().product();
        let values: Vec<f64> = match fill {
            Fill::Init(Init::Const(v)) => vec![*v; numel],
            Fill::Init(Init::Uniform(b)) => (0..numel).map(|_| rng.random_range(-b..*b)).collect(),
            Fill::Init(Init::Normal(s)) => (0..numel)
                .map(|_| s * Distribution::<f64>::sample(&StandardNormal, &mut *rng))
                .collect(),
            Fill::Values(v) => v.clone(),
        };
        // Parameters live in float32 in the reference; round through it so a fresh model and
        // its saved-and-reloaded copy are identical in every dtype.
        Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)
    }
}

enum Fill {
    Init(Init),
    Values(Vec<f64>),
}

fn list<S: AsRef<str>>(names: &[S]) -> String {
    const SHOWN: usize = 12;
    let mut s: Vec<&str> = names.iter().take(SHOWN).map(|n| n.as_ref()).collect();
    let more = names.len().saturating_sub(SHOWN);
    let tail = format!("... and {more} more");
    if more > 0 {
        s.push(&tail);
    }
    s.join(", ")
}

/// A path into a [`ParamStore`], like candle's `VarBuilder`: `pb.pp("encoder_z").pp(0)`.
#[derive(Clone)]
pub struct Pb {
    store: ParamStore,
    prefix: String,
}

impl Pb {
    /// Descend into the attribute `name` (a PyTorch attribute name or a Sequential index).
    pub fn pp<S: ToString>(&self, name: S) -> Pb {
        let name = name.to_string();
        let prefix = if self.prefix.is_empty() {
            name
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Pb {
            store: self.store.clone(),
            prefix,
        }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The trainable parameter `name` with the given shape.
    pub fn get(&self, name: &str, shape: &[usize], init: Init) -> candle_core::Result<Tensor> {
        self.store.create(self.path(name), shape, Fill::Init(init))
    }

    /// A persistent buffer (saved, not trained) whose fresh value is `values`.
    pub fn buffer(
        &self,
        name: &str,
        shape: &[usize],
        values: Vec<f64>,
    ) -> candle_core::Result<Tensor> {
        self.store
            .create(self.path(name), shape, Fill::Values(values))
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }
}
