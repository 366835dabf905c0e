//! Paths as the operating system resolves them: whether an output would land on an input
//! (compared after canonicalisation, for outputs that do not exist yet too), whether two
//! folders overlap, and opening an input only when it is a regular file (a named pipe would
//! block the reader forever, a character device such as `/dev/zero` never ends).

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `path` made absolute with every symbolic link resolved. A path that does not exist (yet) is
/// resolved up to its longest existing ancestor, the rest appended as written (`.` dropped,
/// `..` taken lexically), so that an output about to be created compares with the inputs.
pub fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    // The existing ancestor, and the components below it (innermost last).
    let mut base = absolute.as_path();
    let mut rest = Vec::new();
    while let Some(parent) = base.parent() {
        if let Some(name) = base.file_name() {
            rest.push(name.to_os_string());
        } else if base.ends_with("..") {
            rest.push("..".into());
        }
        base = parent;
        if base.exists() {
            break;
        }
    }
    let mut out = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
    for c in rest.iter().rev() {
        match Path::new(c).components().next() {
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::CurDir) | None => {}
            Some(_) => out.push(c),
        }
    }
    out
}

/// Whether `a` and `b` name the same file or folder once resolved.
pub fn same(a: &Path, b: &Path) -> bool {
    canonical(a) == canonical(b)
}

/// Whether one of the two folders is the other or lies inside it, once resolved.
pub fn overlap(a: &Path, b: &Path) -> bool {
    let (a, b) = (canonical(a), canonical(b));
    a.starts_with(&b) || b.starts_with(&a)
}

/// Refuses an output that would overwrite one of the command's inputs, naming the option,
/// the output and the input: `inputs` are (what it is, path) pairs.
pub fn refuse_overwrite(option: &str, output: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let out = canonical(output);
    for (what, input) in inputs {
        if canonical(input) == out {
            bail!(
                "{option} {}: that is {what} ({}), which this command reads; name another output \
                 file",
                output.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// What a file that is not a regular file is, for error messages.
fn kind(t: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Opens `path` for reading if it is a regular file (a symbolic link to one is followed);
/// anything else (a named pipe, a device, a folder) is an error naming it and what it is.
///
/// The file is opened with `O_NONBLOCK` and its type checked on the open descriptor, so a named
/// pipe without a writer cannot block the open and nothing can be swapped in between the check
/// and the read. `O_NONBLOCK` changes nothing for a regular file's reads.
pub fn open_regular(path: &Path) -> Result<fs::File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let t = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .file_type();
    if !t.is_file() {
        bail!(
            "{} is not a regular file: it is {}; give the path of a file",
            path.display(),
            kind(t)
        );
    }
    Ok(file)
}

/// The whole of a regular file ([`open_regular`]).
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_does_not_exist_resolves_through_its_existing_parent() {
        let dir = std::env::temp_dir().join(format!("fluxflow-paths-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("real")).unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        let real = dir.canonicalize().unwrap().join("real");
        assert_eq!(
            canonical(&dir.join("link/new/x.png")),
            real.join("new/x.png")
        );
        assert_eq!(
            canonical(&dir.join("link/new/../x.png")),
            real.join("x.png")
        );
        assert!(same(&dir.join("link/a.png"), &dir.join("real/./a.png")));
        assert!(overlap(&dir.join("link"), &dir.join("real/sub/deeper")));
        assert!(overlap(&dir.join("real/sub"), &dir.join("link")));
        assert!(!overlap(&dir.join("real/a"), &dir.join("real/ab")));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_regular_file_is_opened() {
        let e = open_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(
            format!("{e:#}").contains("/dev/zero is not a regular file: it is a character device")
        );
        let e = open_regular(Path::new("/")).unwrap_err();
        assert!(format!("{e:#}").contains("a folder"), "{e:#}");
    }
}
