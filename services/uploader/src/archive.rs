//! Building the 7z archive of a study with the `7z` program.
//!
//! The archive holds `<study>/<series>/<sop>.dcm` (paths relative to the
//! spool root), in sorted order, one file per block (`-ms=off`) so a single
//! DICOM can be extracted without decompressing the others — DataLad's
//! archives remote extracts files one at a time. Same files, same level →
//! same bytes, so a redelivered completion maps to the same object key.
//!
//! The program is run with the spool root as working directory and a list
//! file, so no path ever becomes a command-line argument.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context as _;
use tokio::process::Command;

use crate::spool::{self, Digests, SpoolFile};

/// Characters of `7z` output kept in an error message.
const OUTPUT_TAIL: usize = 2000;

/// A built archive in its own temp directory (removed on drop).
#[derive(Debug)]
pub struct Archive {
    /// Archive file name, `<study>.7z`.
    pub name: String,
    /// Its path.
    pub path: PathBuf,
    /// Size and digests of the archive file.
    pub digests: Digests,
    _dir: tempfile::TempDir,
}

/// How to run 7-Zip.
#[derive(Debug, Clone)]
pub struct SevenZip {
    /// The program.
    pub program: PathBuf,
    /// `-mx` level.
    pub level: u8,
}

impl SevenZip {
    /// Checks that the program can be run (at start, so a missing tool is a
    /// start failure rather than a dead letter per study).
    pub async fn check(&self) -> anyhow::Result<()> {
        let out = Command::new(&self.program)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run 7-Zip program {} (BIDSFLUX_7Z)", self.program.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "7-Zip program {} (BIDSFLUX_7Z) exited with {}",
            self.program.display(),
            out.status
        );
        Ok(())
    }

    /// Archives `files` (relative to `spool`) into `<work>/<temp>/<name>`, then hashes it.
    pub async fn build(&self, spool: &Path, work: &Path, name: &str, files: &[SpoolFile]) -> anyhow::Result<Archive> {
        tokio::fs::create_dir_all(work).await.with_context(|| format!("create work directory {}", work.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("bidsflux-upload-")
            .tempdir_in(work)
            .with_context(|| format!("create temp directory in {}", work.display()))?;
        // Absolute paths: 7z runs in the spool.
        let base = std::path::absolute(dir.path()).context("resolve work directory")?;
        let list = base.join("files.txt");
        let path = base.join(name);
        let mut text = String::with_capacity(files.len() * 140);
        for f in files {
            text.push_str(&f.rel_path);
            text.push('\n');
        }
        tokio::fs::write(&list, text).await.with_context(|| format!("write list file {}", list.display()))?;
        let out = Command::new(&self.program)
            .current_dir(spool)
            .args(["a", "-t7z", &format!("-mx{}", self.level), "-ms=off", "-bd", "-y", "-scsUTF-8"])
            .arg(&path)
            .arg(format!("@{}", list.display()))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("run {}", self.program.display()))?;
        // 7z exits 1 on warnings, e.g. a listed file that vanished: not an archive we want.
        if !out.status.success() {
            anyhow::bail!(
                "{} exited with {}: {}",
                self.program.display(),
                out.status,
                tail(&[out.stderr.as_slice(), out.stdout.as_slice()].concat())
            );
        }
        let hashed = path.clone();
        let digests = tokio::task::spawn_blocking(move || spool::hash_file(&hashed))
            .await
            .context("join hashing task")?
            .context("hash archive")?;
        Ok(Archive { name: name.to_owned(), path, digests, _dir: dir })
    }
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let start = s.char_indices().rev().nth(OUTPUT_TAIL).map(|(i, _)| i).unwrap_or(0);
    s[start..].replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bidsflux_session::Uid;

    fn have_7z() -> bool {
        std::path::Path::new("/usr/bin/7z").exists()
    }

    #[tokio::test]
    async fn archives_are_reproducible_and_missing_files_fail() {
        assert!(have_7z(), "/usr/bin/7z is required (Debian p7zip-full; make test installs it)");
        let spool = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(spool.path().join("1.2/3")).unwrap();
        let mut files = Vec::new();
        for i in 1..=3u8 {
            std::fs::write(spool.path().join(format!("1.2/3/{i}.dcm")), vec![i; 5000]).unwrap();
            files.push(SpoolFile {
                rel_path: format!("1.2/3/{i}.dcm"),
                series_instance_uid: Uid::parse("s", "3").unwrap(),
                sop_instance_uid: Uid::parse("s", &i.to_string()).unwrap(),
            });
        }
        let z = SevenZip { program: "7z".into(), level: 5 };
        z.check().await.unwrap();
        let a = z.build(spool.path(), work.path(), "1.2.7z", &files).await.unwrap();
        let b = z.build(spool.path(), work.path(), "1.2.7z", &files).await.unwrap();
        assert_eq!(a.digests, b.digests);
        assert_ne!(a.path, b.path);
        let dir = a.path.parent().unwrap().to_path_buf();
        drop(a);
        assert!(!dir.exists(), "temp dir kept");

        files.push(SpoolFile { rel_path: "1.2/3/4.dcm".into(), ..files[0].clone() });
        let e = z.build(spool.path(), work.path(), "1.2.7z", &files).await.unwrap_err();
        assert!(format!("{e:#}").contains("exited with"), "{e:#}");
    }

    #[tokio::test]
    async fn a_missing_program_is_reported() {
        let z = SevenZip { program: "/nonexistent/7z".into(), level: 5 };
        let e = format!("{:#}", z.check().await.unwrap_err());
        assert!(e.contains("BIDSFLUX_7Z"), "{e}");
    }
}
