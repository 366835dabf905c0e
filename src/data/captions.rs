//! The captions file: one `name<TAB>caption` line per image, as the reference reads it.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Captions by name, in file order of first appearance.
#[derive(Debug, Default)]
pub(crate) struct Captions {
    by_name: HashMap<String, String>,
}

impl Captions {
    /// Reads `path`. Blank lines are skipped; the name is everything before the first tab,
    /// the caption everything after it (trimmed). A non-blank line without a tab, or with an
    /// empty name, is an error naming the line and the file. A name given twice keeps its
    /// first caption (COCO-style files list several captions per image).
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the captions file {}", path.display()))?;
        let mut by_name = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((name, caption)) = line.split_once('\t') else {
                bail!(
                    "{} line {}: expected `name<TAB>caption`, found no tab",
                    path.display(),
                    i + 1
                );
            };
            let name = name.trim();
            if name.is_empty() {
                bail!(
                    "{} line {}: the image name before the tab is empty",
                    path.display(),
                    i + 1
                );
            }
            by_name
                .entry(name.to_string())
                .or_insert_with(|| caption.trim().to_string());
        }
        Ok(Self { by_name })
    }

    /// The caption of the image at `rel` (relative to the data folder): the line naming its
    /// relative path (with `/` separators) if there is one, else the line naming its file name.
    pub(crate) fn lookup(&self, rel: &Path) -> Option<&str> {
        let rel_name = slash_path(rel);
        if let Some(c) = self.by_name.get(&rel_name) {
            return Some(c);
        }
        let file_name = rel.file_name()?.to_string_lossy();
        self.by_name.get(file_name.as_ref()).map(String::as_str)
    }

    /// How many named lines match none of `rels` (neither as relative path nor file name).
    pub(crate) fn unmatched<'a>(&self, rels: impl Iterator<Item = &'a Path>) -> usize {
        let mut used = std::collections::HashSet::new();
        for rel in rels {
            used.insert(slash_path(rel));
            if let Some(n) = rel.file_name() {
                used.insert(n.to_string_lossy().into_owned());
            }
        }
        self.by_name.keys().filter(|k| !used.contains(*k)).count()
    }
}

/// `a/b/c.png` whatever the platform's separator.
pub(crate) fn slash_path(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("fluxflow-captions-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("captions.txt");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn relative_path_wins_over_file_name_and_first_caption_is_kept() {
        let p = write(
            "ok",
            "a.png\tplain\r\n\nsub/a.png\tnested\nb.jpg\tfirst\nb.jpg\tsecond\n",
        );
        let c = Captions::read(&p).unwrap();
        assert_eq!(c.lookup(Path::new("a.png")), Some("plain"));
        assert_eq!(c.lookup(Path::new("sub/a.png")), Some("nested"));
        assert_eq!(c.lookup(Path::new("other/a.png")), Some("plain"));
        assert_eq!(c.lookup(Path::new("x/b.jpg")), Some("first"));
        assert_eq!(c.lookup(Path::new("c.png")), None);
        let rels = [Path::new("a.png"), Path::new("x/b.jpg")];
        assert_eq!(c.unmatched(rels.into_iter()), 1); // sub/a.png
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn a_line_without_tab_names_line_and_file() {
        let p = write("bad", "a.png\tfine\nno tab here\n");
        let err = format!("{:#}", Captions::read(&p).unwrap_err());
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("captions.txt"), "{err}");
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}
