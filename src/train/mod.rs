//! Training machinery: losses, adaptive weights, EMA, the Phase 1 step, and optimizers and
//! learning-rate schedulers with PyTorch semantics.

pub mod adaptive;
pub mod ema;
pub mod factory;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod precision;
pub mod sample;
pub mod schedule;
pub mod step;
