//! The fleet's memory in the data directory: `{data_dir}/fleet/journal.json`.
//!
//! Invariants:
//! - The journal is replaced atomically (temporary file, fsync, rename, fsync of the directory):
//!   after a crash or a power cut it is the old one or the new one, never a mix.
//! - A document is written here before it is applied; a document that could not be written is
//!   refused (a restart would not find it).
//! - Per topic, at most two documents: the last good one (`good`: the gateway ran
//!   `fleet.confirm_after` with it) and a newer one on trial (`trial`). The trial counts the runs
//!   that used it and did not end in a clean stop ([`Store::clean_stop`]); a start finding it
//!   used `fleet.rollback_after` times without confirmation
//!   rolls it back to the good one (or to none), records why, and the same bytes are refused
//!   when the broker delivers them again.
//!
//! Layer: app.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A document kept in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doc {
    /// The exact bytes received (checked UTF-8 before they get here).
    pub text: String,
    pub sha256: String,
    /// RFC 3339.
    pub applied_at: String,
    /// Signing time (Unix ms) of a signed document.
    pub signed_at: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Slot {
    good: Option<Doc>,
    trial: Option<Doc>,
    /// Runs of the gateway with `trial` in force (the one that applied it included).
    runs: u32,
}

/// A document taken back at a start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    pub topic: String,
    pub sha256: String,
    pub at: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Journal {
    slots: BTreeMap<String, Slot>,
    rolled_back: Vec<RolledBack>,
}

/// Rollbacks remembered (the oldest are forgotten).
const MAX_ROLLED_BACK: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct StoreError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

pub struct Store {
    dir: PathBuf,
    journal: Journal,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Store {
    /// Open (or create) `{data_dir}/fleet`. A journal that cannot be read as one is moved
    /// aside (`journal.json.corrupt-<unix seconds>`) and reported in the second value; the
    /// gateway then starts with its local rules only.
    pub fn open(data_dir: &Path) -> Result<(Store, Option<String>), StoreError> {
        let dir = data_dir.join("fleet");
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(err(&dir))?;
        let path = dir.join("journal.json");
        let mut problem = None;
        let journal = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Journal>(&bytes) {
                Ok(j) => j,
                Err(e) => {
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let aside = dir.join(format!("journal.json.corrupt-{secs}"));
                    std::fs::rename(&path, &aside).map_err(err(&path))?;
                    problem = Some(format!(
                        "{} could not be read ({e}); moved to {}: started with the local rules only",
                        path.display(),
                        aside.display()
                    ));
                    Journal::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Journal::default(),
            Err(e) => return Err(err(&path)(e)),
        };
        Ok((Store { dir, journal }, problem))
    }

    fn save(&self) -> Result<(), StoreError> {
        let path = self.dir.join("journal.json");
        let tmp = self.dir.join("journal.json.tmp");
        let err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| StoreError { path: p, source }
        };
        let bytes =
            serde_json::to_vec(&self.journal).map_err(|e| err(&path)(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&tmp).map_err(err(&tmp))?;
        f.write_all(&bytes).map_err(err(&tmp))?;
        f.sync_all().map_err(err(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(err(&path))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err(&self.dir))
    }

    /// A start: every trial document has one run more; those already used `rollback_after`
    /// times without confirmation are rolled back (returned, and remembered).
    pub fn start(&mut self, rollback_after: u32) -> Result<Vec<RolledBack>, StoreError> {
        let mut rolled = Vec::new();
        for (topic, slot) in self.journal.slots.iter_mut() {
            let Some(trial) = &slot.trial else { continue };
            if slot.runs >= rollback_after {
                let r = RolledBack {
                    topic: topic.clone(),
                    sha256: trial.sha256.clone(),
                    at: now(),
                    reason: format!(
                        "the gateway ran {} times with this document without staying up fleet.confirm_after; back to {}",
                        slot.runs,
                        slot.good
                            .as_ref()
                            .map_or("no document".to_string(), |g| format!("the last good one ({})", g.sha256)),
                    ),
                };
                slot.trial = None;
                slot.runs = 0;
                rolled.push(r);
            } else {
                slot.runs += 1;
            }
        }
        self.journal.rolled_back.extend(rolled.iter().cloned());
        let n = self.journal.rolled_back.len();
        if n > MAX_ROLLED_BACK {
            self.journal.rolled_back.drain(..n - MAX_ROLLED_BACK);
        }
        if !self.journal.slots.is_empty() {
            self.save()?;
        }
        Ok(rolled)
    }

    /// The document in force for `topic` (its trial, else its good one).
    pub fn in_force(&self, topic: &str) -> Option<&Doc> {
        let s = self.journal.slots.get(topic)?;
        s.trial.as_ref().or(s.good.as_ref())
    }

    /// Has the gateway run long enough with this topic's document (no trial pending)?
    pub fn confirmed(&self, topic: &str) -> bool {
        self.journal
            .slots
            .get(topic)
            .is_none_or(|s| s.trial.is_none())
    }

    /// Was this document rolled back (then it is not applied again)?
    pub fn rolled_back(&self, topic: &str, sha256: &str) -> Option<&RolledBack> {
        self.journal
            .rolled_back
            .iter()
            .rev()
            .find(|r| r.topic == topic && r.sha256 == sha256)
    }

    pub fn rollbacks(&self) -> &[RolledBack] {
        &self.journal.rolled_back
    }

    /// Keep `doc` as the trial document of `topic` (durably, before it is applied).
    pub fn apply(&mut self, topic: &str, doc: Doc) -> Result<(), StoreError> {
        let old = self.journal.clone();
        let slot = self.journal.slots.entry(topic.to_string()).or_default();
        slot.trial = Some(doc);
        slot.runs = 1;
        if let Err(e) = self.save() {
            self.journal = old;
            return Err(e);
        }
        Ok(())
    }

    /// The gateway ran `fleet.confirm_after` with its documents: they become the good ones.
    pub fn confirm(&mut self) -> Result<(), StoreError> {
        let mut changed = false;
        for slot in self.journal.slots.values_mut() {
            if let Some(t) = slot.trial.take() {
                slot.good = Some(t);
                slot.runs = 0;
                changed = true;
            }
        }
        if changed {
            self.save()?;
        }
        Ok(())
    }

    /// The gateway stops cleanly: this run does not count as a failed one for the documents
    /// on trial (only starts that end in a crash, a kill or a failed start do).
    pub fn clean_stop(&mut self) -> Result<(), StoreError> {
        let mut changed = false;
        for slot in self.journal.slots.values_mut() {
            if slot.trial.is_some() && slot.runs > 0 {
                slot.runs -= 1;
                changed = true;
            }
        }
        if changed {
            self.save()?;
        }
        Ok(())
    }

    /// Has any topic a document on trial?
    pub fn on_trial(&self) -> bool {
        self.journal.slots.values().any(|s| s.trial.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Doc {
        Doc {
            text: text.into(),
            sha256: crate::app::fleet::document::sha256_hex(text.as_bytes()),
            applied_at: now(),
            signed_at: None,
        }
    }

    #[test]
    fn documents_survive_a_reopen_and_bad_ones_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, problem) = Store::open(dir.path()).unwrap();
        assert!(problem.is_none());
        s.apply("t", doc("one")).unwrap();
        s.confirm().unwrap();
        s.apply("t", doc("two")).unwrap();
        // Two more runs with "two", none confirmed: the third start rolls it back.
        for run in 0..3 {
            let (mut s, _) = Store::open(dir.path()).unwrap();
            let rolled = s.start(3).unwrap();
            if run < 2 {
                assert!(rolled.is_empty());
                assert_eq!(s.in_force("t").unwrap().text, "two");
            } else {
                assert_eq!(rolled.len(), 1);
                assert_eq!(rolled[0].sha256, doc("two").sha256);
                assert_eq!(s.in_force("t").unwrap().text, "one");
                assert!(s.rolled_back("t", &doc("two").sha256).is_some());
            }
        }
        let (s, _) = Store::open(dir.path()).unwrap();
        assert_eq!(s.in_force("t").unwrap().text, "one");
        assert!(s.rolled_back("t", &doc("two").sha256).is_some());
        assert!(!dir.path().join("fleet/journal.json.tmp").exists());
    }

    /// Restarts that end in a clean stop are no crash loop: however many, no rollback; the
    /// crashes after them still count.
    #[test]
    fn clean_restarts_do_not_roll_a_document_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(dir.path()).unwrap();
        s.apply("t", doc("one")).unwrap();
        s.clean_stop().unwrap();
        for _ in 0..10 {
            let (mut s, _) = Store::open(dir.path()).unwrap();
            assert!(
                s.start(3).unwrap().is_empty(),
                "a clean restart rolled back"
            );
            s.clean_stop().unwrap();
        }
        // Now it crash-loops: three runs without a clean stop, and the start after them rolls
        // it back.
        for _ in 0..3 {
            let (mut s, _) = Store::open(dir.path()).unwrap();
            assert!(s.start(3).unwrap().is_empty());
        }
        let (mut s, _) = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.start(3).unwrap().len(),
            1,
            "crashes after clean restarts still count"
        );
    }

    #[test]
    fn a_confirmed_document_is_never_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(dir.path()).unwrap();
        s.apply("t", doc("one")).unwrap();
        s.confirm().unwrap();
        for _ in 0..5 {
            let (mut s, _) = Store::open(dir.path()).unwrap();
            assert!(s.start(1).unwrap().is_empty());
            assert_eq!(s.in_force("t").unwrap().text, "one");
        }
    }

    #[test]
    fn a_corrupt_journal_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("fleet")).unwrap();
        std::fs::write(dir.path().join("fleet/journal.json"), b"{\"slots\": 3").unwrap();
        let (s, problem) = Store::open(dir.path()).unwrap();
        assert!(problem.unwrap().contains("moved to"));
        assert!(s.in_force("t").is_none());
        assert!(!dir.path().join("fleet/journal.json").exists());
    }
}
