//! Optimizers with the update rules of `torch.optim` (single-tensor path) and lion-pytorch.
//!
//! Each optimizer is a [`ParamOptimizer`] over named candle [`Var`]s, driven by an
//! [`UpdateRule`] (its validated hyper-parameters). State is explicit: per-parameter step
//! counts and moment buffers, exported as named tensors ([`Optimizer::state_tensors`], for
//! safetensors) plus a serde [`OptimizerState`] (for JSON), and restored with
//! [`Optimizer::load_state`] or [`restore`]. As in PyTorch, a parameter without a gradient in
//! the [`GradStore`] is skipped: no decay, no state, no step.

mod adam;
mod common;
pub mod exact_f64;
pub mod fused;
mod lion;
mod rmsprop;
mod sgd;

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

pub use adam::{AdamArgs, AdamConfig, AdamWConfig};
pub use lion::LionConfig;
pub use rmsprop::{RmsPropArgs, RmsPropConfig};
pub use sgd::SgdConfig;

/// Errors of optimizer construction, stepping and state restore; each names the model.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer for \"{model}\": {field} must be {expected}, got {value:?}")]
    InvalidHyperParameter {
        model: String,
        field: &'static str,
        expected: &'static str,
        value: f64,
    },
    #[error("optimizer for \"{model}\": {field}: {reason}")]
    InvalidCombination {
        model: String,
        field: &'static str,
        reason: &'static str,
    },
    #[error("optimizer for \"{model}\": no parameters to optimize")]
    NoParameters { model: String },
    #[error("optimizer for \"{model}\": parameter \"{name}\" is given twice")]
    DuplicateParameter { model: String, name: String },
    #[error("optimizer for \"{model}\": cannot load state: {reason}")]
    State { model: String, reason: String },
    #[error("optimizer for \"{model}\": updating \"{param}\": {source}")]
    Update {
        model: String,
        param: String,
        #[source]
        source: Box<candle_core::Error>,
    },
}

pub type Result<T> = std::result::Result<T, OptimError>;

/// Which optimizer and its hyper-parameters, as written in a config file:
/// `{"type": "RMSprop", "lr": 1e-5, "alpha": 0.95, ...}`. Absent fields take PyTorch's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum OptimizerSpec {
    #[serde(rename = "RMSprop")]
    RmsProp(RmsPropConfig),
    Adam(AdamConfig),
    AdamW(AdamWConfig),
    #[serde(rename = "SGD")]
    Sgd(SgdConfig),
    Lion(LionConfig),
}

impl OptimizerSpec {
    /// The PyTorch class name: "RMSprop", "Adam", "AdamW", "SGD" or "Lion".
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RmsProp(_) => "RMSprop",
            Self::Adam(_) => "Adam",
            Self::AdamW(_) => "AdamW",
            Self::Sgd(_) => "SGD",
            Self::Lion(_) => "Lion",
        }
    }

    /// Checks the hyper-parameters without building an optimizer; errors name `model` and the
    /// field.
    pub fn validate(&self, model: &str) -> Result<()> {
        match self {
            Self::RmsProp(c) => c.validate(model),
            Self::Adam(c) => c.validate(model),
            Self::AdamW(c) => c.validate(model),
            Self::Sgd(c) => c.validate(model),
            Self::Lion(c) => c.validate(model),
        }
    }

    /// The configured (initial) learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::RmsProp(c) => c.lr,
            Self::Adam(c) => c.lr,
            Self::AdamW(c) => c.lr,
            Self::Sgd(c) => c.lr,
            Self::Lion(c) => c.lr,
        }
    }
}

/// Scalar optimizer state for JSON: hyper-parameters, current learning rate, per-parameter
/// step counts (parameters that never had a gradient are absent). The tensors go separately
/// through [`Optimizer::state_tensors`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    pub spec: OptimizerSpec,
    /// Current learning rate, stored as an exact decimal string (see [`exact_f64`]).
    #[serde(with = "exact_f64")]
    pub lr: f64,
    pub steps: BTreeMap<String, u64>,
}

/// What the training loop uses: one step, the learning rate, state export and import.
pub trait Optimizer: Send {
    /// Updates every parameter that has a gradient in `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, 1.0)
    }
    /// [`Optimizer::step`] with every gradient multiplied by `scale` first (gradient clipping's
    /// factor; 1.0: as they are), as `grad * scale` would, without a scaled copy of the
    /// gradients where the update runs fused (see [`fused`]).
    fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<()>;
    /// Current learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate used by the following steps (what a scheduler does).
    fn set_lr(&mut self, lr: f64);
    /// The hyper-parameters this optimizer was built with (initial learning rate).
    fn spec(&self) -> OptimizerSpec;
    /// State buffers named `<param name>.<buffer>` (e.g. `enc.w.exp_avg`), PyTorch's names.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Scalar state for JSON.
    fn scalar_state(&self) -> OptimizerState;
    /// Restores a state saved by [`Optimizer::scalar_state`] and [`Optimizer::state_tensors`].
    /// As PyTorch's `load_state_dict`, the saved hyper-parameters replace the current ones; the
    /// optimizer kind must match. Tensors move to each parameter's device and dtype.
    fn load_state(
        &mut self,
        state: &OptimizerState,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()>;
}

/// Per-parameter state buffers by PyTorch name (`square_avg`, `exp_avg`, ...).
pub type Buffers = BTreeMap<&'static str, Tensor>;

/// The update of one optimizer kind; implemented by its config struct.
pub trait UpdateRule: Clone + Send + Sized {
    /// Checks the hyper-parameters; errors name `model` and the field.
    fn validate(&self, model: &str) -> Result<()>;
    /// The configured (initial) learning rate.
    fn initial_lr(&self) -> f64;
    fn to_spec(&self) -> OptimizerSpec;
    /// This rule's config when `spec` is of the same kind.
    fn from_spec(spec: &OptimizerSpec) -> Option<Self>;
    /// Names of the buffers a parameter has after its first step.
    fn buffer_names(&self) -> Vec<&'static str>;
    /// `update` with the gradient times `scale` (when given) as one pass over the elements, on
    /// the CPU (see [`fused`]), writing the parameter in place: `Ok(true)` when done, `Ok(false)`
    /// (nothing touched) where this rule or these tensors have no fused path.
    fn update_fused(
        &self,
        _lr: f64,
        _step: u64,
        _var: &Var,
        _grad: &Tensor,
        _scale: Option<f64>,
        _buffers: &mut Buffers,
    ) -> candle_core::Result<bool> {
        Ok(false)
    }
    /// New parameter value after one step; `step` counts this one (1 on the first).
    /// `param` and `grad` are detached; buffers are updated in place.
    fn update(
        &self,
        lr: f64,
        step: u64,
        param: &Tensor,
        grad: &Tensor,
        buffers: &mut Buffers,
    ) -> candle_core::Result<Tensor>;
}

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    step: u64,
    buffers: Buffers,
}

/// An optimizer: named parameters, their state, and the update rule `R`.
#[derive(Debug)]
pub struct ParamOptimizer<R> {
    model: String,
    rule: R,
    lr: f64,
    slots: Vec<Slot>,
}

pub type RmsProp = ParamOptimizer<RmsPropConfig>;
pub type Adam = ParamOptimizer<AdamConfig>;
pub type AdamW = ParamOptimizer<AdamWConfig>;
pub type Sgd = ParamOptimizer<SgdConfig>;
pub type Lion = ParamOptimizer<LionConfig>;

impl<R: UpdateRule> ParamOptimizer<R> {
    /// Validates `rule` and takes the parameters (names must be unique, as state keys).
    pub fn new(model: &str, rule: R, params: Vec<(String, Var)>) -> Result<Self> {
        rule.validate(model)?;
        if params.is_empty() {
            return Err(OptimError::NoParameters {
                model: model.to_string(),
            });
        }
        let mut seen = HashSet::new();
        for (name, _) in &params {
            if !seen.insert(name.as_str()) {
                return Err(OptimError::DuplicateParameter {
                    model: model.to_string(),
                    name: name.clone(),
                });
            }
        }
        let slots = params
            .into_iter()
            .map(|(name, var)| Slot {
                name,
                var,
                step: 0,
                buffers: Buffers::new(),
            })
            .collect();
        Ok(Self {
            model: model.to_string(),
            lr: rule.initial_lr(),
            rule,
            slots,
        })
    }

    /// The validated hyper-parameters.
    pub fn config(&self) -> &R {
        &self.rule
    }

    fn state_error(&self, reason: String) -> OptimError {
        OptimError::State {
            model: self.model.clone(),
            reason,
        }
    }
}

impl<R: UpdateRule> Optimizer for ParamOptimizer<R> {
    fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<()> {
        let scale = (scale != 1.0).then_some(scale);
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            slot.step += 1;
            if slot.var.elem_count() == 0 {
                continue;
            }
            let grad = grad.detach();
            let (rule, lr, step) = (&self.rule, self.lr, slot.step);
            let updated = rule
                .update_fused(lr, step, &slot.var, &grad, scale, &mut slot.buffers)
                .and_then(|done| {
                    if done {
                        return Ok(());
                    }
                    let grad = match scale {
                        Some(s) => grad.affine(s, 0.0)?,
                        None => grad,
                    };
                    let param = slot.var.as_tensor().detach();
                    let new = rule.update(lr, step, &param, &grad, &mut slot.buffers)?;
                    slot.var.set(&new)
                });
            updated.map_err(|source| OptimError::Update {
                model: self.model.clone(),
                param: slot.name.clone(),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn spec(&self) -> OptimizerSpec {
        self.rule.to_spec()
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|slot| {
                slot.buffers
                    .iter()
                    .map(|(buffer, t)| (format!("{}.{buffer}", slot.name), t.clone()))
            })
            .collect()
    }

    fn scalar_state(&self) -> OptimizerState {
        OptimizerState {
            spec: self.rule.to_spec(),
            lr: self.lr,
            steps: self
                .slots
                .iter()
                .filter(|s| s.step > 0)
                .map(|s| (s.name.clone(), s.step))
                .collect(),
        }
    }

    fn load_state(
        &mut self,
        state: &OptimizerState,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let rule = R::from_spec(&state.spec).ok_or_else(|| {
            self.state_error(format!(
                "saved state is for {}, this optimizer is {}",
                state.spec.kind(),
                self.rule.to_spec().kind()
            ))
        })?;
        rule.validate(&self.model)?;
        if let Some(name) = state
            .steps
            .keys()
            .find(|name| !self.slots.iter().any(|s| &s.name == *name))
        {
            return Err(self.state_error(format!("unknown parameter \"{name}\"")));
        }
        let names = rule.buffer_names();
        let mut loaded = Vec::with_capacity(self.slots.len());
        let mut used = HashSet::new();
        for slot in &self.slots {
            let step = state.steps.get(&slot.name).copied().unwrap_or(0);
            let mut buffers = Buffers::new();
            if step > 0 {
                for &buffer in &names {
                    let key = format!("{}.{buffer}", slot.name);
                    let t = tensors
                        .get(&key)
                        .ok_or_else(|| self.state_error(format!("missing tensor \"{key}\"")))?;
                    if t.shape() != slot.var.shape() {
                        return Err(self.state_error(format!(
                            "tensor \"{key}\" has shape {:?}, the parameter {:?}",
                            t.shape(),
                            slot.var.shape()
                        )));
                    }
                    let t = t
                        .to_device(slot.var.device())
                        .and_then(|t| t.to_dtype(slot.var.dtype()))
                        .map_err(|e| self.state_error(format!("tensor \"{key}\": {e}")))?;
                    buffers.insert(buffer, t);
                    used.insert(key);
                }
            }
            loaded.push((step, buffers));
        }
        let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
        unexpected.sort();
        if let Some(key) = unexpected.first() {
            return Err(self.state_error(format!("unexpected tensor \"{key}\"")));
        }
        for (slot, (step, buffers)) in self.slots.iter_mut().zip(loaded) {
            slot.step = step;
            slot.buffers = buffers;
        }
        self.rule = rule;
        self.lr = state.lr;
        Ok(())
    }
}

/// Builds the optimizer `spec` describes over `params`, for the model named `model`.
pub fn build(
    model: &str,
    spec: &OptimizerSpec,
    params: Vec<(String, Var)>,
) -> Result<Box<dyn Optimizer>> {
    Ok(match spec {
        OptimizerSpec::RmsProp(c) => Box::new(RmsProp::new(model, c.clone(), params)?),
        OptimizerSpec::Adam(c) => Box::new(Adam::new(model, c.clone(), params)?),
        OptimizerSpec::AdamW(c) => Box::new(AdamW::new(model, c.clone(), params)?),
        OptimizerSpec::Sgd(c) => Box::new(Sgd::new(model, c.clone(), params)?),
        OptimizerSpec::Lion(c) => Box::new(Lion::new(model, c.clone(), params)?),
    })
}

/// Builds an optimizer from saved state: [`build`] with the saved spec, then
/// [`Optimizer::load_state`].
pub fn restore(
    model: &str,
    state: &OptimizerState,
    tensors: &HashMap<String, Tensor>,
    params: Vec<(String, Var)>,
) -> Result<Box<dyn Optimizer>> {
    let mut optimizer = build(model, &state.spec, params)?;
    optimizer.load_state(state, tensors)?;
    Ok(optimizer)
}
