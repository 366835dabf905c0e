//! Whether a request fits in memory, checked before its tensors are allocated: a size that
//! cannot fit is refused with the estimate instead of aborting in the allocator.
//!
//! The estimate covers the activations, which grow with the pixels; the weights and optimizer
//! state are already allocated when it is made, and the memory they hold is no longer
//! available. Its coefficients were measured with `fluxflow bench` (Phase 1 model, vae_dim 128,
//! float32, CPU): a forward pass peaks at about 23 KB per pixel (256x256 against 128x128), a
//! training step at about 37 KB per pixel (64x64 against 32x32). The estimate stays below
//! them (40 and 60 values per channel and pixel, 20 KB and 31 KB at vae_dim 128), so a request
//! it refuses would not have fitted.
//!
//! What the estimate is held against, in this order:
//! - a budget given with `--memory-budget SIZE` (train, resume, bench, reconstruct, eval);
//! - else one given in the environment variable [`BUDGET_ENV`];
//! - else the memory detected as available: on CUDA the driver's free memory; on the CPU the
//!   smallest of `MemAvailable` (/proc/meminfo), the address-space limit (`ulimit -v`,
//!   `RLIMIT_AS`) less the process's address space, and the memory cgroup's limit less its
//!   usage (its own and every ancestor's, cgroup v2 or v1; the inactive file cache, which the
//!   kernel reclaims first, is not counted as usage).
//!
//! The budget is resolved once per process ([`init_budget`], called by the binary at
//! start-up) and every [`check_fits`] uses it; the refusal says where it came from.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use crate::model::ModelConfig;

/// Activation values per channel (`vae_dim`) and pixel of a forward pass.
const FORWARD_PER_CHANNEL_PIXEL: u64 = 40;
/// Activation values per channel and pixel of a training step (forward and backward).
const TRAINING_PER_CHANNEL_PIXEL: u64 = 60;

/// The environment variable that sets the memory budget when `--memory-budget` is not given.
pub const BUDGET_ENV: &str = "FLUXFLOW_MEMORY_BUDGET";

/// The syntax of a SIZE, for error messages.
const SIZE_SYNTAX: &str = "expected bytes or a number with a unit: K, M, G, T (powers of 1000, \
                           also KB, MB, GB, TB) or KiB, MiB, GiB, TiB (powers of 1024), \
                           case-insensitive, e.g. 512M, 8GiB, 1.5T";

/// Estimated activation bytes of `batch` images of `height` x `width` through the VAE.
pub fn activation_bytes(
    cfg: &ModelConfig,
    batch: usize,
    height: usize,
    width: usize,
    dtype: DType,
    training: bool,
) -> u64 {
    let per = if training {
        TRAINING_PER_CHANNEL_PIXEL
    } else {
        FORWARD_PER_CHANNEL_PIXEL
    };
    (batch as u64)
        .saturating_mul(height as u64)
        .saturating_mul(width as u64)
        .saturating_mul(cfg.vae_dim as u64)
        .saturating_mul(per)
        .saturating_mul(dtype.size_in_bytes() as u64)
}

/// A memory size as given on the command line or in the environment: its bytes and the text
/// it was written as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Size {
    pub bytes: u64,
    pub text: String,
}

impl Size {
    /// Parses a SIZE (see [`parse_size`]); the value parser of `--memory-budget`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(Self {
            bytes: parse_size(s)?,
            text: s.trim().to_string(),
        })
    }
}

/// Bytes of a SIZE: a whole number of bytes (`1048576`, `1048576B`), or a number, possibly
/// with a fraction, and a unit: `K`, `M`, `G`, `T` or `KB` ... `TB` (powers of 1000), `KiB` ...
/// `TiB` (powers of 1024); case-insensitive, a space allowed before the unit. A fraction of a
/// byte is rounded down. Zero is refused (it would refuse every request).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u128 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => bail!("{s:?} is not a size: unknown unit {unit:?}; {SIZE_SYNTAX}"),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        bail!("{s:?} is not a size: {SIZE_SYNTAX}");
    }
    let too_large = || anyhow::anyhow!("{s:?} is too large a size (at most 2^64 - 1 bytes)");
    let mut mantissa: u128 = 0;
    for c in int.chars().chain(frac.chars()) {
        let d = u128::from(c.to_digit(10).unwrap_or(0));
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(d))
            .ok_or_else(too_large)?;
    }
    let scale = u32::try_from(frac.len())
        .ok()
        .and_then(|n| 10u128.checked_pow(n))
        .ok_or_else(too_large)?;
    let bytes = mantissa.checked_mul(mult).ok_or_else(too_large)? / scale;
    let bytes = u64::try_from(bytes).map_err(|_| too_large())?;
    if bytes == 0 {
        bail!("{s:?}: a memory budget must be at least 1 byte");
    }
    Ok(bytes)
}

/// Where a memory budget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// `--memory-budget`.
    Flag,
    /// [`BUDGET_ENV`].
    Env,
}

/// A memory budget that replaces the detection of available memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub size: Size,
    pub source: BudgetSource,
}

impl Budget {
    /// The budget from `--memory-budget` (`flag`) or else from the value of [`BUDGET_ENV`]
    /// (`env`); none when neither is given. A bad value of the variable is an error naming it.
    pub fn resolve(flag: Option<Size>, env: Option<&OsStr>) -> Result<Option<Self>> {
        if let Some(size) = flag {
            return Ok(Some(Self {
                size,
                source: BudgetSource::Flag,
            }));
        }
        let Some(v) = env else {
            return Ok(None);
        };
        let text = v
            .to_str()
            .with_context(|| format!("{BUDGET_ENV}={v:?} is not valid UTF-8"))?;
        let size = Size::parse(text).with_context(|| format!("{BUDGET_ENV}={text}"))?;
        Ok(Some(Self {
            size,
            source: BudgetSource::Env,
        }))
    }

    fn describe(&self) -> String {
        match self.source {
            BudgetSource::Flag => format!("--memory-budget {}", self.size.text),
            BudgetSource::Env => format!("{BUDGET_ENV}={}", self.size.text),
        }
    }
}

static BUDGET: OnceLock<Option<Budget>> = OnceLock::new();

/// Sets this process's memory budget from `--memory-budget` (`flag`, which wins) and
/// [`BUDGET_ENV`]; with neither, [`check_fits`] detects the available memory. Called once, at
/// start-up, before any check: a second call is an error.
pub fn init_budget(flag: Option<Size>) -> Result<Option<Budget>> {
    let budget = Budget::resolve(flag, std::env::var_os(BUDGET_ENV).as_deref())?;
    BUDGET
        .set(budget.clone())
        .map_err(|_| anyhow::anyhow!("the memory budget was already set for this process"))?;
    Ok(budget)
}

/// The process's budget: [`init_budget`]'s, or, where it was not called (the library used on
/// its own), [`BUDGET_ENV`]'s.
fn process_budget() -> Result<Option<Budget>> {
    if let Some(b) = BUDGET.get() {
        return Ok(b.clone());
    }
    let b = Budget::resolve(None, std::env::var_os(BUDGET_ENV).as_deref())?;
    Ok(BUDGET.get_or_init(|| b).clone())
}

/// Which detected limit is the smallest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// `MemAvailable` of /proc/meminfo.
    MemAvailable,
    /// The address-space limit (`RLIMIT_AS`) less the process's address space (`VmSize`).
    AddressSpace { limit: u64, in_use: u64 },
    /// A memory cgroup's limit less its usage.
    Cgroup {
        dir: PathBuf,
        limit: u64,
        usage: u64,
    },
    /// The CUDA driver's free memory.
    GpuFree,
}

/// What a request is held against: a budget, or the memory detected as available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    Budget(Budget),
    Detected { bytes: u64, what: Detected },
}

impl Limit {
    pub fn bytes(&self) -> u64 {
        match self {
            Self::Budget(b) => b.size.bytes,
            Self::Detected { bytes, .. } => *bytes,
        }
    }
}

/// A byte count for people: decimal units, three significant figures.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    let (v, unit) = if b >= 1e12 {
        (b / 1e12, "TB")
    } else if b >= 1e9 {
        (b / 1e9, "GB")
    } else if b >= 1e6 {
        (b / 1e6, "MB")
    } else if b >= 1e3 {
        (b / 1e3, "kB")
    } else {
        return format!("{bytes} bytes");
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {unit}")
}

/// Refuses `what` when its estimated `bytes` exceed `limit`; the error gives the estimate, the
/// limit and where the limit came from.
pub fn check_against(what: &str, bytes: u64, limit: &Limit) -> Result<()> {
    if bytes <= limit.bytes() {
        return Ok(());
    }
    let need = human_bytes(bytes);
    let have = human_bytes(limit.bytes());
    match limit {
        Limit::Budget(b) => bail!(
            "{what} needs about {need} for its activations, more than the memory budget of \
             {have} ({}); use fewer or smaller images, or a larger budget",
            b.describe()
        ),
        Limit::Detected { what: from, .. } => {
            let from = match from {
                Detected::MemAvailable => {
                    "available in this machine's memory (MemAvailable in /proc/meminfo)".into()
                }
                Detected::AddressSpace { limit, in_use } => format!(
                    "left under the address-space limit (ulimit -v: {} less the {} this \
                     process has mapped)",
                    human_bytes(*limit),
                    human_bytes(*in_use)
                ),
                Detected::Cgroup { dir, limit, usage } => format!(
                    "left in the memory cgroup {} ({} limit, {} in use)",
                    dir.display(),
                    human_bytes(*limit),
                    human_bytes(*usage)
                ),
                Detected::GpuFree => "free on the GPU".into(),
            };
            bail!(
                "{what} needs about {need} for its activations, and {have} are {from}; use \
                 fewer or smaller images (--memory-budget SIZE or {BUDGET_ENV} sets the memory \
                 to hold it against instead)"
            )
        }
    }
}

/// Refuses `what` when its estimated `bytes` exceed the process's memory budget or, without
/// one, the memory available on `device` (see the module's documentation).
pub fn check_fits(what: &str, bytes: u64, device: &Device) -> Result<()> {
    let limit = match process_budget()? {
        Some(b) => Some(Limit::Budget(b)),
        None => detect(device),
    };
    match limit {
        Some(limit) => check_against(what, bytes, &limit),
        None => Ok(()),
    }
}

/// Memory available for new allocations on `device` in bytes, if known (see [`detect`]).
pub fn available_bytes(device: &Device) -> Option<u64> {
    detect(device).map(|l| l.bytes())
}

/// The memory available for new allocations on `device`, if known, and which limit it is: on
/// the CPU the smallest of `MemAvailable`, the address-space limit's room and the memory
/// cgroups' room; on CUDA the driver's free memory.
pub fn detect(device: &Device) -> Option<Limit> {
    match device {
        Device::Cpu => detect_cpu(),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            crate::gpu::free_bytes(device)
                .ok()
                .flatten()
                .map(|bytes| Limit::Detected {
                    bytes,
                    what: Detected::GpuFree,
                })
        }
        _ => None,
    }
}

fn detect_cpu() -> Option<Limit> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let mut found = Vec::new();
    if let Some(bytes) = read("/proc/meminfo").and_then(|s| meminfo_available(&s)) {
        found.push((bytes, Detected::MemAvailable));
    }
    if let Some(limit) = address_space_limit() {
        let in_use = read("/proc/self/status")
            .and_then(|s| status_vm_size(&s))
            .unwrap_or(0);
        found.push((
            limit.saturating_sub(in_use),
            Detected::AddressSpace { limit, in_use },
        ));
    }
    if let (Some(mounts), Some(groups)) = (read("/proc/self/mountinfo"), read("/proc/self/cgroup"))
    {
        found.extend(cgroup_room(&mounts, &groups));
    }
    found
        .into_iter()
        .min_by_key(|(bytes, _)| *bytes)
        .map(|(bytes, what)| Limit::Detected { bytes, what })
}

/// `MemAvailable` of /proc/meminfo's text, in bytes.
pub fn meminfo_available(meminfo: &str) -> Option<u64> {
    kb_field(meminfo, "MemAvailable:")
}

/// `VmSize` (the address space in use) of /proc/self/status's text, in bytes.
pub fn status_vm_size(status: &str) -> Option<u64> {
    kb_field(status, "VmSize:")
}

/// A `Key:   N kB` line's N, in bytes.
fn kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The soft address-space limit (`RLIMIT_AS`) in bytes; none when unlimited.
fn address_space_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the limits into `r`, which outlives the call.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) } == 0;
        (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// A mounted cgroup hierarchy that holds the memory controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// cgroup v2 (the unified hierarchy), else v1's memory hierarchy.
    pub v2: bool,
    /// The cgroup mounted there (the mount's root within the hierarchy).
    pub root: String,
    pub mount_point: PathBuf,
}

/// The cgroup mounts of /proc/self/mountinfo's text: every `cgroup2` mount, and the `cgroup`
/// (v1) mounts of the memory controller.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split_whitespace().collect();
            let post: Vec<&str> = post.split_whitespace().collect();
            let (root, mount_point) = (pre.get(3)?, pre.get(4)?);
            let v2 = match *post.first()? {
                "cgroup2" => true,
                "cgroup" if post.get(2)?.split(',').any(|o| o == "memory") => false,
                _ => return None,
            };
            Some(CgroupMount {
                v2,
                root: unescape_mount_path(root),
                mount_point: PathBuf::from(unescape_mount_path(mount_point)),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The process's cgroup paths from /proc/self/cgroup's text: the unified (v2) hierarchy's
/// (`0::PATH`) and v1's memory hierarchy's (`N:...,memory,...:PATH`).
pub fn parse_proc_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let (mut v2, mut v1) = (None, None);
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_string());
        }
    }
    (v2, v1)
}

/// A cgroup's limit file's value in bytes; none for no limit (`max` in v2; v1's "unlimited",
/// a page-rounded 2^63 - 1, or anything from 2^62 up).
pub fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|&v| v < 1 << 62)
}

/// A `key value` line's value of a cgroup's memory.stat text.
pub fn memory_stat(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The directory of the cgroup `path` under `mount`, or the mount point itself where the
/// path is not below the mount's root (a cgroup namespace's path outside it, `/../x`).
fn cgroup_dir(mount: &CgroupMount, path: &str) -> PathBuf {
    let rel = if mount.root == "/" {
        Some(path)
    } else {
        path.strip_prefix(mount.root.as_str())
            .filter(|r| r.is_empty() || r.starts_with('/'))
    };
    match rel {
        Some(r) if !r.split('/').any(|c| c == "..") => {
            mount.mount_point.join(r.trim_start_matches('/'))
        }
        _ => mount.mount_point.clone(),
    }
}

/// The room of each limited memory cgroup from the process's own up to the mount's root:
/// its limit less its usage (less the inactive file cache). Each as `(bytes, Detected)`.
fn cgroup_room(mountinfo: &str, proc_cgroup: &str) -> Vec<(u64, Detected)> {
    let (v2_path, v1_path) = parse_proc_cgroup(proc_cgroup);
    let mut out = Vec::new();
    for mount in parse_mountinfo(mountinfo) {
        let Some(path) = (if mount.v2 { &v2_path } else { &v1_path }) else {
            continue;
        };
        let mut dir = cgroup_dir(&mount, path);
        // A container without its own cgroup namespace sees the host's path for its cgroup,
        // mounted as the root: then the mount point is the process's cgroup.
        if !dir.is_dir() {
            dir = mount.mount_point.clone();
        }
        let (limit_file, usage_file, inactive_key) = if mount.v2 {
            ("memory.max", "memory.current", "inactive_file")
        } else {
            (
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        };
        let mut at: Option<&Path> = Some(&dir);
        while let Some(d) = at {
            let read = |f: &str| std::fs::read_to_string(d.join(f)).ok();
            if let Some(limit) = read(limit_file).and_then(|s| parse_cgroup_limit(&s)) {
                let current = read(usage_file)
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                let inactive = read("memory.stat")
                    .and_then(|s| memory_stat(&s, inactive_key))
                    .unwrap_or(0);
                let usage = current.saturating_sub(inactive);
                out.push((
                    limit.saturating_sub(usage),
                    Detected::Cgroup {
                        dir: d.to_path_buf(),
                        limit,
                        usage,
                    },
                ));
            }
            at = if d == mount.mount_point {
                None
            } else {
                d.parent()
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_bytes_and_decimal_and_binary_units() {
        let cases: &[(&str, u64)] = &[
            ("1", 1),
            ("4096", 4096),
            ("4096b", 4096),
            ("512M", 512_000_000),
            ("512mb", 512_000_000),
            ("8G", 8_000_000_000),
            ("8GB", 8_000_000_000),
            ("8gb", 8_000_000_000),
            ("8GiB", 8 << 30),
            ("8gib", 8 << 30),
            ("1.5T", 1_500_000_000_000),
            ("1.5TiB", 3 << 39),
            ("2K", 2_000),
            ("2KiB", 2048),
            ("0.5k", 500),
            (" 3 MiB ", 3 << 20),
            ("1.", 1),
            (".5G", 500_000_000),
            ("18446744073709551615", u64::MAX),
        ];
        for (s, want) in cases {
            assert_eq!(parse_size(s).unwrap(), *want, "{s}");
        }
    }

    #[test]
    fn bad_sizes_are_errors_that_quote_them() {
        for s in [
            "",
            "G",
            "abc",
            "8X",
            "8 GiBs",
            "-1G",
            "1e9",
            "1.2.3G",
            "0",
            "0.0001",
            "inf",
            "1,5G",
            "18446744073709551616",
            "20000000T",
        ] {
            let e = parse_size(s).unwrap_err().to_string();
            assert!(e.contains(&format!("{s:?}")), "{s}: {e}");
        }
        assert!(parse_size("8X").unwrap_err().to_string().contains("GiB"));
    }

    #[test]
    fn the_flag_wins_over_the_environment_and_a_bad_variable_is_named() {
        let flag = Size::parse("1G").unwrap();
        let b = Budget::resolve(Some(flag.clone()), Some(OsStr::new("junk"))).unwrap();
        assert_eq!(b.unwrap().source, BudgetSource::Flag);
        let b = Budget::resolve(None, Some(OsStr::new("2GiB")))
            .unwrap()
            .unwrap();
        assert_eq!((b.size.bytes, b.source), (2 << 30, BudgetSource::Env));
        assert_eq!(Budget::resolve(None, None).unwrap(), None);
        let e = format!(
            "{:#}",
            Budget::resolve(None, Some(OsStr::new("lots"))).unwrap_err()
        );
        assert!(e.contains("FLUXFLOW_MEMORY_BUDGET=lots"), "{e}");
    }

    #[test]
    fn a_refusal_names_the_estimate_and_where_the_limit_came_from() {
        let budget = |source| {
            Limit::Budget(Budget {
                size: Size::parse("1M").unwrap(),
                source,
            })
        };
        assert!(check_against("x", 1_000_000, &budget(BudgetSource::Flag)).is_ok());
        let e = check_against("a step", 1_000_001, &budget(BudgetSource::Flag))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a step needs about 1.00 MB") && e.contains("(--memory-budget 1M)"),
            "{e}"
        );
        let e = check_against("a step", 2_500_000, &budget(BudgetSource::Env))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2.50 MB") && e.contains("(FLUXFLOW_MEMORY_BUDGET=1M)"),
            "{e}"
        );
        let detected = |what| Limit::Detected { bytes: 1000, what };
        for (what, needle) in [
            (Detected::MemAvailable, "MemAvailable"),
            (
                Detected::AddressSpace {
                    limit: 5000,
                    in_use: 4000,
                },
                "ulimit -v: 5.00 kB less the 4.00 kB",
            ),
            (
                Detected::Cgroup {
                    dir: "/sys/fs/cgroup/a".into(),
                    limit: 2000,
                    usage: 1000,
                },
                "cgroup /sys/fs/cgroup/a (2.00 kB limit, 1.00 kB in use)",
            ),
        ] {
            let e = check_against("it", 1001, &detected(what))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("it needs about 1.00 kB") && e.contains(needle),
                "{e}"
            );
        }
    }

    #[test]
    fn human_bytes_keeps_three_figures() {
        assert_eq!(human_bytes(999), "999 bytes");
        assert_eq!(human_bytes(15_728_640), "15.7 MB");
        assert_eq!(human_bytes(128_849_018_880), "129 GB");
        assert_eq!(human_bytes(4_026_531_840), "4.03 GB");
    }

    #[test]
    fn meminfo_and_status_fields() {
        let meminfo = "MemTotal:       24588416 kB\nMemFree:        21091212 kB\n\
                       MemAvailable:   23162312 kB\nBuffers:          226604 kB\n";
        assert_eq!(meminfo_available(meminfo), Some(23162312 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        let status = "Name:\tfluxflow\nVmPeak:\t  123456 kB\nVmSize:\t   98304 kB\n\
                      VmHWM:\t    4096 kB\n";
        assert_eq!(status_vm_size(status), Some(98304 * 1024));
        assert_eq!(status_vm_size("VmSize:\tjunk kB\n"), None);
    }

    #[test]
    fn cgroup_mounts_from_mountinfo() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 20 0:40 / /mnt/with\\040space rw - cgroup2 none rw
";
        assert_eq!(
            parse_mountinfo(text),
            vec![
                CgroupMount {
                    v2: false,
                    root: "/docker/abc".into(),
                    mount_point: "/sys/fs/cgroup/memory".into()
                },
                CgroupMount {
                    v2: true,
                    root: "/".into(),
                    mount_point: "/sys/fs/cgroup/unified".into()
                },
                CgroupMount {
                    v2: true,
                    root: "/".into(),
                    mount_point: "/mnt/with space".into()
                },
            ]
        );
    }

    #[test]
    fn cgroup_paths_from_proc_self_cgroup() {
        let v1 = "9:name=systemd:/\n4:memory:/process_api/2ae1\n3:cpuset:/\n0::/\n";
        assert_eq!(
            parse_proc_cgroup(v1),
            (Some("/".into()), Some("/process_api/2ae1".into()))
        );
        let joint = "5:cpu,memory:/a/b\n";
        assert_eq!(parse_proc_cgroup(joint), (None, Some("/a/b".into())));
        let v2 = "0::/user.slice/user-1000.slice/session-2.scope\n";
        assert_eq!(
            parse_proc_cgroup(v2),
            (
                Some("/user.slice/user-1000.slice/session-2.scope".into()),
                None
            )
        );
    }

    #[test]
    fn cgroup_limits_and_stats() {
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_limit("4294967296\n"), Some(4 << 30));
        assert_eq!(parse_cgroup_limit("junk"), None);
        let stat = "anon 1000\nfile 5000\ninactive_file 4227072\ntotal_inactive_file 9\n";
        assert_eq!(memory_stat(stat, "inactive_file"), Some(4227072));
        assert_eq!(memory_stat(stat, "total_inactive_file"), Some(9));
        assert_eq!(memory_stat(stat, "active_file"), None);
    }

    #[test]
    fn a_cgroup_path_maps_below_its_mount() {
        let m = |root: &str| CgroupMount {
            v2: true,
            root: root.into(),
            mount_point: "/sys/fs/cgroup".into(),
        };
        assert_eq!(
            cgroup_dir(&m("/"), "/a/b"),
            PathBuf::from("/sys/fs/cgroup/a/b")
        );
        assert_eq!(
            cgroup_dir(&m("/a"), "/a/b"),
            PathBuf::from("/sys/fs/cgroup/b")
        );
        assert_eq!(cgroup_dir(&m("/a"), "/a"), PathBuf::from("/sys/fs/cgroup"));
        // Not below the mount's root (another namespace's path): the mount point.
        assert_eq!(cgroup_dir(&m("/a"), "/ab"), PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(
            cgroup_dir(&m("/x"), "/../y"),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert_eq!(
            cgroup_dir(&m("/"), "/../y"),
            PathBuf::from("/sys/fs/cgroup")
        );
    }

    #[test]
    fn cgroup_room_walks_up_to_the_mount_and_skips_unlimited_levels() {
        let root = std::env::temp_dir().join(format!("fluxflow-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let leaf = root.join("a/b");
        std::fs::create_dir_all(&leaf).unwrap();
        // The root: no limit; a: 8 GB with 3 GB in use (1 GB of it inactive cache); b: max.
        std::fs::write(root.join("memory.max"), "max\n").unwrap();
        std::fs::write(root.join("a/memory.max"), "8000000000\n").unwrap();
        std::fs::write(root.join("a/memory.current"), "3000000000\n").unwrap();
        std::fs::write(root.join("a/memory.stat"), "inactive_file 1000000000\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "max\n").unwrap();
        let mountinfo = format!("41 31 0:38 / {} rw - cgroup2 cgroup2 rw\n", root.display());
        let room = cgroup_room(&mountinfo, "0::/a/b\n");
        assert_eq!(
            room,
            vec![(
                6_000_000_000,
                Detected::Cgroup {
                    dir: root.join("a"),
                    limit: 8_000_000_000,
                    usage: 2_000_000_000
                }
            )]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
