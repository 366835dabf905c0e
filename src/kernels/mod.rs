//! Custom ops where candle's are slow. On the CPU, candle's transposed convolution (used by the
//! expander and by every convolution's input gradient) is a naive loop; `conv` replaces it with
//! a matrix product and a col2im scatter. On CUDA (`cudnn` feature) every convolution pass runs
//! on cuDNN (`cudnn`), never on candle's naive kernels.

pub mod bezier;
pub mod conv;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cudnn")]
pub mod cudnn;
pub mod group_norm;
pub mod softmax;

pub use conv::{conv2d, conv_transpose2d};
