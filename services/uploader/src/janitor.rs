//! The spool janitor: reports studies left in the spool too long.
//!
//! Every `BIDSFLUX_SPOOL_JANITOR_INTERVAL` it walks `<spool>/<study>/<series>/`
//! (skipping `.tmp`, `.journal` and every other dot entry, which belong to the
//! receiver) and reports each study whose newest file is older than
//! `BIDSFLUX_SPOOL_STALE_AFTER`: one warn line per study (StudyInstanceUID,
//! file count, age — no patient values) and the `bidsflux_uploader_spool_stale_*`
//! gauges. Such a study was not indexed (or discarded) in time: an upload or
//! indexing that dead-lettered, a held study, or `BIDSFLUX_SPOOL_KEEP`.
//!
//! It never deletes a file. Unless `BIDSFLUX_SPOOL_KEEP` is set, it removes
//! series and study directories that are **empty and unchanged for
//! `BIDSFLUX_SPOOL_EMPTY_DIR_AGE`** (the lifecycle's deletions leave them
//! behind). The race with the receiver: it creates a directory
//! (`create_dir_all`) and links the instance into it right away. A directory
//! it just created or linked into has a fresh modification time (creating or
//! removing an entry updates it), so it is not removed; `rmdir` fails on a
//! directory that is not empty, so a file is never lost. Only a receiver that
//! stalled longer than the age between creating a directory and linking into
//! it would see its link fail — and then its store fails before Success is
//! answered, so the sender retries; nothing is lost either way.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bidsflux_service::tasks::Every;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
pub use crate::report::{Report, StaleStudy};

/// Janitor settings.
#[derive(Debug, Clone)]
pub struct Janitor {
    /// The spool root.
    pub spool_dir: std::path::PathBuf,
    /// A study whose newest file is older than this is stale.
    pub stale_after: Duration,
    /// Empty directories unchanged this long are removed.
    pub empty_dir_age: Duration,
    /// `BIDSFLUX_SPOOL_KEEP`: remove nothing, not even empty directories.
    pub keep: bool,
}

fn age(now: SystemTime, t: SystemTime) -> Duration {
    now.duration_since(t).unwrap_or_default()
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with('.')
}

/// Removes `dir` if it is empty and unchanged for `min_age`; `Ok(true)` if removed.
fn remove_if_quiet(dir: &Path, now: SystemTime, min_age: Duration) -> io::Result<bool> {
    let meta = std::fs::metadata(dir)?;
    if age(now, meta.modified()?) < min_age {
        return Ok(false);
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        // Not empty (a file arrived), or already gone.
        Err(e) if matches!(e.kind(), io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::NotFound) => Ok(false),
        Err(e) => Err(e),
    }
}

impl Janitor {
    /// Walks the spool once (blocking).
    pub fn pass(&self, now: SystemTime) -> io::Result<Report> {
        let mut report = Report::default();
        let studies = match std::fs::read_dir(&self.spool_dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
            Err(e) => return Err(e),
        };
        for study in studies {
            let study = study?;
            if is_hidden(&study.file_name()) || !study.file_type()?.is_dir() {
                continue;
            }
            let (mut files, mut newest) = (0u64, None::<SystemTime>);
            let mut series_left = false;
            for series in std::fs::read_dir(study.path())? {
                let series = series?;
                if !series.file_type()?.is_dir() {
                    series_left = true;
                    continue;
                }
                let mut series_files = 0u64;
                for f in std::fs::read_dir(series.path())? {
                    let f = f?;
                    let Ok(meta) = f.metadata() else { continue };
                    series_files += 1;
                    if meta.is_file() {
                        let m = meta.modified()?;
                        newest = Some(newest.map_or(m, |n| n.max(m)));
                    }
                }
                files += series_files;
                if series_files == 0 && !self.keep && remove_if_quiet(&series.path(), now, self.empty_dir_age)? {
                    report.removed_dirs += 1;
                } else {
                    series_left = true;
                }
            }
            if files == 0 {
                if !series_left && !self.keep && remove_if_quiet(&study.path(), now, self.empty_dir_age)? {
                    report.removed_dirs += 1;
                }
                continue;
            }
            if let Some(n) = newest {
                let a = age(now, n);
                if a > self.stale_after {
                    let uid = study.file_name().to_string_lossy().into_owned();
                    report.stale.push(StaleStudy { study: uid, files, age: a });
                }
            }
        }
        report.stale.sort_by(|a, b| a.study.cmp(&b.study));
        Ok(report)
    }

    /// Runs a pass every `interval` until `shutdown`, logging and recording each.
    pub async fn run(self, interval: Duration, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        let mut every = Every::new(interval, shutdown);
        while every.tick().await {
            let j = self.clone();
            match tokio::task::spawn_blocking(move || j.pass(SystemTime::now())).await {
                Ok(Ok(report)) => {
                    for s in &report.stale {
                        tracing::warn!(
                            study_uid = s.study,
                            files = s.files,
                            age_s = s.age.as_secs(),
                            "study still in the spool, not indexed after BIDSFLUX_SPOOL_STALE_AFTER"
                        );
                    }
                    tracing::debug!(stale = report.stale.len(), removed_dirs = report.removed_dirs, "janitor pass");
                    metrics.record_janitor(&report);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "janitor pass failed; next one at the next interval")
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "janitor pass did not finish"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_stale_studies_skips_dot_dirs_and_removes_only_quiet_empty_dirs() {
        let spool = tempfile::tempdir().unwrap();
        let root = spool.path();
        std::fs::create_dir_all(root.join("1.2.3/4.5")).unwrap();
        std::fs::write(root.join("1.2.3/4.5/6.dcm"), b"x").unwrap();
        std::fs::create_dir_all(root.join("1.2.3/4.6")).unwrap(); // empty series
        std::fs::create_dir_all(root.join(".journal/x")).unwrap();
        std::fs::write(root.join(".journal/x/old"), b"j").unwrap();
        std::fs::create_dir_all(root.join(".tmp")).unwrap();
        let j = Janitor {
            spool_dir: root.to_path_buf(),
            stale_after: Duration::from_secs(3600),
            empty_dir_age: Duration::from_secs(600),
            keep: false,
        };
        // Now: nothing stale, the empty series is too fresh to remove.
        let r = j.pass(SystemTime::now()).unwrap();
        assert!(r.stale.is_empty() && r.removed_dirs == 0, "{r:?}");
        assert!(root.join("1.2.3/4.6").is_dir());
        // Two hours later: stale, the empty series removed, the file and dot dirs untouched.
        let later = SystemTime::now() + Duration::from_secs(7200);
        let r = j.pass(later).unwrap();
        assert_eq!(r.stale.len(), 1);
        assert_eq!((r.stale[0].study.as_str(), r.stale[0].files), ("1.2.3", 1));
        assert_eq!(r.removed_dirs, 1);
        assert!(!root.join("1.2.3/4.6").exists());
        assert!(root.join("1.2.3/4.5/6.dcm").is_file() && root.join(".journal/x/old").is_file());
        // Once the file is gone, the series and then the study go (quiet ones only).
        std::fs::remove_file(root.join("1.2.3/4.5/6.dcm")).unwrap();
        let r = j.pass(later).unwrap();
        assert!(r.stale.is_empty());
        assert_eq!(r.removed_dirs, 2);
        assert!(!root.join("1.2.3").exists() && root.join(".tmp").is_dir());
    }

    #[test]
    fn keep_removes_no_directory() {
        let spool = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(spool.path().join("1.2/3.4")).unwrap();
        let j = Janitor {
            spool_dir: spool.path().to_path_buf(),
            stale_after: Duration::from_secs(1),
            empty_dir_age: Duration::ZERO,
            keep: true,
        };
        let r = j.pass(SystemTime::now() + Duration::from_secs(60)).unwrap();
        assert_eq!(r.removed_dirs, 0);
        assert!(spool.path().join("1.2/3.4").is_dir());
    }
}
