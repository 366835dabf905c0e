//! One module per subcommand; each returns what it reports so the binary prints it.

pub mod bench;
pub mod compare;
pub mod eval;
pub mod info;
pub mod reconstruct;
pub mod train;

pub use crate::device::parse_device;
