//! Choosing the compute device from a setting.

use anyhow::{bail, Result};
use candle_core::Device;

/// Parses `cpu`, `cuda` or `cuda:N`. A CUDA device gets its memory pool configured to keep
/// freed memory cached between steps (`crate::gpu::configure`).
pub fn parse_device(spec: &str) -> Result<Device> {
    if spec.starts_with("cuda") && !candle_core::utils::cuda_is_available() {
        bail!(
            "device {spec:?}: this fluxflow was built without CUDA support; build it with \
             `--features cuda` as the README's \"GPU set-up\" says (scripts/cuda-toolchain.sh \
             installs the toolkit), or use --device cpu"
        );
    }
    let device = match spec {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n)?,
            _ => bail!("unknown device {spec:?}: use cpu, cuda or cuda:N"),
        },
    };
    #[cfg(feature = "cuda")]
    crate::gpu::configure(&device)?;
    Ok(device)
}
