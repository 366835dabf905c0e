//! What a checkpoint records of the data set it trained on (`images.json` in the checkpoint
//! folder): every usable image's path relative to the data folder and its training size. A
//! resumed run compares it with the data folder as it is now, to say how many images were
//! added and removed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Dataset;

/// One image: its path relative to the data folder, and its training size (width, height).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedImage(pub String, pub u32, pub u32);

/// The images of a data set, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRecord {
    pub images: Vec<RecordedImage>,
}

/// How a data set differs from a record of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataChange {
    /// Paths now present that the record lacks.
    pub added: Vec<String>,
    /// Recorded paths no longer present.
    pub removed: Vec<String>,
    /// Paths in both whose training size changed (the file was replaced).
    pub resized: Vec<String>,
}

impl DataChange {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.resized.is_empty()
    }

    /// "3 images added (a.png, b.png, c.png), 1 removed (d.png)": counts, with the first few
    /// paths of each kind.
    pub fn describe(&self) -> String {
        fn some(paths: &[String]) -> String {
            const SHOWN: usize = 3;
            let mut s = paths
                .iter()
                .take(SHOWN)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if paths.len() > SHOWN {
                s.push_str(&format!(", ... {} more", paths.len() - SHOWN));
            }
            s
        }
        let mut parts = vec![
            format!("{} image(s) added", self.added.len()),
            format!("{} removed", self.removed.len()),
        ];
        if !self.resized.is_empty() {
            parts.push(format!(
                "{} replaced by an image of another training size ({})",
                self.resized.len(),
                some(&self.resized)
            ));
        }
        let mut s = parts.join(", ");
        for (what, paths) in [("added", &self.added), ("removed", &self.removed)] {
            if !paths.is_empty() {
                s.push_str(&format!("; {what}: {}", some(paths)));
            }
        }
        s
    }
}

impl DataRecord {
    /// The record of a scanned data set.
    pub fn of(dataset: &Dataset) -> Self {
        let mut images: Vec<RecordedImage> = dataset
            .entries
            .iter()
            .map(|e| RecordedImage(e.path.to_string_lossy().into_owned(), e.size.0, e.size.1))
            .collect();
        images.sort_by(|a, b| a.0.cmp(&b.0));
        Self { images }
    }

    /// What `now` added, removed and resized relative to this record.
    pub fn changes(&self, now: &DataRecord) -> DataChange {
        let before: BTreeMap<&str, (u32, u32)> = self
            .images
            .iter()
            .map(|RecordedImage(p, w, h)| (p.as_str(), (*w, *h)))
            .collect();
        let after: BTreeMap<&str, (u32, u32)> = now
            .images
            .iter()
            .map(|RecordedImage(p, w, h)| (p.as_str(), (*w, *h)))
            .collect();
        let mut change = DataChange::default();
        for (p, size) in &after {
            match before.get(p) {
                None => change.added.push(p.to_string()),
                Some(old) if old != size => change.resized.push(p.to_string()),
                Some(_) => {}
            }
        }
        change.removed = before
            .keys()
            .filter(|p| !after.contains_key(*p))
            .map(|p| p.to_string())
            .collect();
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(images: &[(&str, u32)]) -> DataRecord {
        DataRecord {
            images: images
                .iter()
                .map(|(p, w)| RecordedImage(p.to_string(), *w, 32))
                .collect(),
        }
    }

    #[test]
    fn changes_count_added_removed_and_resized_images() {
        let old = record(&[("a.png", 32), ("b.png", 32), ("c.png", 32)]);
        let new = record(&[("b.png", 48), ("c.png", 32), ("d.png", 32), ("e.png", 32)]);
        let c = old.changes(&new);
        assert_eq!(c.added, vec!["d.png", "e.png"]);
        assert_eq!(c.removed, vec!["a.png"]);
        assert_eq!(c.resized, vec!["b.png"]);
        assert!(old.changes(&old).is_empty());
        let d = c.describe();
        assert!(
            d.starts_with("2 image(s) added, 1 removed, 1 replaced"),
            "{d}"
        );
        assert!(
            d.contains("added: d.png, e.png") && d.contains("removed: a.png"),
            "{d}"
        );
    }
}
