//! Choosing the compute device from a setting.

use anyhow::{bail, Result};
use candle_core::Device;

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    if spec.starts_with("cuda") && !candle_core::utils::cuda_is_available() {
        bail!(
            "device {spec:?}: this fluxflow was built without CUDA support; rebuild with \
             `cargo build --release --features cuda` (needs the CUDA toolkit) or use --device cpu"
        );
    }
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::new_cuda(n)?),
            _ => bail!("unknown device {spec:?}: use cpu, cuda or cuda:N"),
        },
    }
}
