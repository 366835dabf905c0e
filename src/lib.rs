//! fluxflow: the FluxFlow VAE (Bezier-activation image autoencoder) on candle.
//!
//! `model` ports the PyTorch reference (fluxflow-core) layer for layer, `checkpoint` reads and
//! writes its safetensors files, `train` holds the training machinery, `data` the image folder
//! scan, batch order and parallel decoding, `image_io` the image conversions.

pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod data;
pub mod image_io;
pub mod model;
pub mod nn;
pub mod params;
pub mod train;
