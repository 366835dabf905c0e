//! Custom ops where candle's are slow: on the CPU, candle's transposed convolution (used by the
//! expander and by every convolution's input gradient) is a naive loop; these replace it with a
//! matrix product and a col2im scatter. Other devices keep candle's ops.

pub mod conv;

pub use conv::{conv2d, conv_transpose2d};
