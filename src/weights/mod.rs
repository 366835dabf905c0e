//! Weights files in the reference's safetensors format: reading with bounded memory (`read`),
//! writing (`write`), detecting a model file's architecture (`detect`), and loading and saving
//! the model's own files (`model_file`).
//!
//! Words: a *weights file* is any safetensors file of tensors; the *model file*
//! (`flxflow_final.safetensors`) and the *text projection file* (`text_encoder.safetensors`)
//! are the reference's two; a *checkpoint* is a run's saved state (`run::checkpoint`),
//! and recomputing activations in the backward pass is *recomputation* (`model::recompute`).

pub mod detect;
pub mod model_file;
pub mod read;
pub mod write;

pub use detect::{detect_config, read_architecture};
pub use model_file::{load_model, load_model_as, save_model, Loaded, TEXT_FILE};
pub use read::{check_finite, read_tensors, read_tensors_where};
pub use write::{to_safetensors_bytes, to_safetensors_bytes_exact};
