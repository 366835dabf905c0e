//! The memory this process can still allocate, as the machine and its limits say: `MemAvailable`,
//! the address-space limit (`ulimit -v`) and the memory cgroups, or the GPU's free memory.

use std::path::{Path, PathBuf};

use candle_core::Device;

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

/// The memory available for new allocations on `device`, if known, and which limit it is: on
/// the CPU the smallest of `MemAvailable`, the address-space limit's room and the memory
/// cgroups' room; on CUDA the driver's free memory.
pub fn detect(device: &Device) -> Option<(u64, Detected)> {
    match device {
        Device::Cpu => detect_cpu(),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::device::cuda_pool::free_bytes(device)
            .ok()
            .flatten()
            .map(|bytes| (bytes, Detected::GpuFree)),
        _ => None,
    }
}

fn detect_cpu() -> Option<(u64, Detected)> {
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
    found.into_iter().min_by_key(|(bytes, _)| *bytes)
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
