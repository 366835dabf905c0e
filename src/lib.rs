//! fluxflow: the FluxFlow VAE (Bezier-activation image autoencoder) on candle.
//!
//! `model` ports the PyTorch reference (fluxflow-core) layer for layer, `weights` reads and
//! writes its safetensors files, `train` holds the training machinery, `run` the run loop and its
//! checkpoints, `config` the training configuration, `data` the image folder pipeline,
//! `image_io` the image conversions used by the commands, `report` the summary, plots and sample
//! galleries of a run, `kernels` the custom ops (CPU and CUDA side by side per op), `memory` the
//! memory estimate and budget, `paths` the path comparisons that keep an output off an input and
//! the opening of inputs as regular files only.

pub mod atomic_write;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod device;
pub mod eval;
pub mod image_io;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod nn;
pub mod params;
pub mod paths;
pub mod quality;
pub mod report;
pub mod resize_rule;
pub mod run;
pub mod train;
pub mod weights;
