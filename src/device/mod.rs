//! Choosing the compute device from a setting.

#[cfg(feature = "cuda")]
pub mod cuda_pool;

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A device setting, checked when the configuration is read: `cpu`, `cuda` (the first GPU) or
/// `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// `cuda` is `Cuda(None)`, `cuda:N` is `Cuda(Some(N))` (kept apart so that the setting is
    /// written back as it was given).
    Cuda(Option<usize>),
}

impl DeviceSpec {
    pub fn is_cpu(&self) -> bool {
        *self == DeviceSpec::Cpu
    }

    /// Opens the device (see [`parse_device`]).
    pub fn open(&self) -> Result<Device> {
        parse_device(&self.to_string())
    }
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(None)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(Some(n))),
                _ => bail!("unknown device {s:?}: use cpu, cuda or cuda:N"),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`. A CUDA device gets its memory pool configured to keep
/// freed memory cached between steps (`cuda_pool::configure`).
pub fn parse_device(spec: &str) -> Result<Device> {
    let parsed: DeviceSpec = spec.parse()?;
    if !parsed.is_cpu() && !candle_core::utils::cuda_is_available() {
        bail!(
            "device {spec:?}: this fluxflow was built without CUDA support; build it with \
             `--features cuda` as the README's \"GPU set-up\" says (scripts/cuda-toolchain.sh \
             installs the toolkit), or use --device cpu"
        );
    }
    let device = match parsed {
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(n) => Device::new_cuda(n.unwrap_or(0))?,
    };
    #[cfg(feature = "cuda")]
    cuda_pool::configure(&device)?;
    Ok(device)
}
