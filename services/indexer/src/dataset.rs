//! Building a session dataset with git and git-annex plumbing.
//!
//! The result is what `datalad create` + `datalad add-archive-content
//! --strip-leading-dirs` + `datalad save` leave behind, without DataLad and
//! without the archive's bytes (the manifest has every size and md5):
//!
//! 1. a DataLad dataset (`.datalad/config` with a dataset id derived from the
//!    StudyInstanceUID, DataLad's `.gitattributes`), or the project's existing
//!    history when it already has one (amendments);
//! 2. the archive and every DICOM as git-annex symlinks (the ones `git annex
//!    fromkey` makes, staged with git plumbing), committed with a
//!    `Bidsflux-Archive-Key:` trailer;
//! 3. on the git-annex branch ([`crate::annex_branch`]): the S3 special remote
//!    holding the archive (wanted: archives only), DataLad's archives remote,
//!    and for each DICOM its location and `dl+archive:` URL;
//! 4. `main` and `git-annex` pushed atomically.
//!
//! If the project's `main` already has a commit with the trailer of this
//! archive, nothing is written and that commit is returned: redelivery
//! converges.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use bidsflux_session::Uid;
use uuid::Uuid;

use crate::annex_branch::{BranchUpdate, DATALAD_ARCHIVES_UUID, Timestamp, hash_dir_mixed};
use crate::forge::Project;
use crate::git::Git;
use crate::job::{IndexJob, S3Remote};

/// Trailer naming the archive a commit indexes.
pub const ARCHIVE_KEY_TRAILER: &str = "Bidsflux-Archive-Key";
/// Trailer with the generation (0 = study, 1.. = amendments) a commit indexes.
pub const GENERATION_TRAILER: &str = "Bidsflux-Generation";
/// Name of the S3 special remote in the dataset (as in the original BIDS-flux).
pub const S3_REMOTE_NAME: &str = "s3-dicoms";
/// What the S3 remote wants: archives only (the original's expression).
pub const ARCHIVES_WANTED: &str = "include=*7z or include=*.tar.gz or include=*zip";
/// Namespace of the v5 UUIDs the indexer derives (dataset ids, S3 remote UUIDs).
const NAMESPACE: Uuid = Uuid::from_u128(0x5d0f_6a2e_8c41_4b7e_9a36_1f2b_7c4d_e081);
/// Description of the throw-away repository the indexer builds in.
const WORK_REPO_DESCRIPTION: &str = "bidsflux indexer work tree (removed after push)";

/// The result of indexing one archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    /// DataLad dataset id.
    pub dataset_id: String,
    /// Commit on `main` that holds the archive.
    pub commit: String,
    /// False when the forge already had it (nothing was pushed).
    pub pushed: bool,
}

/// The DataLad dataset id of a study's session dataset: a v5 UUID of the
/// StudyInstanceUID, so every replica and every retry agrees on it.
pub fn dataset_id(study: &Uid) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("datalad-dataset:{study}").as_bytes())
}

/// The UUID of the S3 special remote holding a study's archives.
///
/// Derived from where the objects are (bucket and key prefix), not from how
/// they are reached: when the endpoint changes (a new public host, port or
/// scheme), the next indexing of the study rewrites the configuration of the
/// same `s3-dicoms` remote instead of adding a second one.
pub fn s3_remote_uuid(s3: &S3Remote) -> Uuid {
    let name = format!("s3:{}/{}", s3.bucket, s3.fileprefix);
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

/// Builds the dataset of `job` in the empty directory `work` and pushes it to
/// `project`. A new dataset also gets `files` (`(path, content)`, the rendered
/// `session` template: its `.gitattributes` replaces DataLad's default).
pub async fn index(
    git: &Git,
    work: &Path,
    job: &IndexJob,
    project: &Project,
    files: &[(String, String)],
) -> anyhow::Result<Indexed> {
    let (dataset_id, newest_generation) = match open(git, work, job, project, files).await? {
        Opened::AlreadyIndexed(indexed) => return Ok(indexed),
        Opened::Ready { dataset_id, newest_generation } => (dataset_id, newest_generation),
    };
    // Amendments may be indexed out of order: never replace the archive file
    // of a newer generation with an older one (its files are added all the same).
    let with_archive = newest_generation.is_none_or(|newest| newest <= job.generation);
    add_files(git, work, job, with_archive).await?;
    let message = format!(
        "[bidsflux] index study {study} (generation {generation})\n\n\
         {files} DICOM files from {name}, obtainable with `datalad get`.\n\n\
         {ARCHIVE_KEY_TRAILER}: {key}\n{GENERATION_TRAILER}: {generation}\n",
        study = job.study,
        generation = job.generation,
        files = job.files.len(),
        name = job.archive.name,
        key = job.archive.key,
    );
    git.run_input(work, &["commit", "-q", "--allow-empty", "-F", "-"], message.into_bytes())
        .await
        .context("commit indexed files")?;
    let mut update = branch_update(job);
    // git-annex itself never runs: the work repository is described as
    // `git annex init` would, and marked dead (it is deleted after the push
    // and never held content) so clones do not list it as a place to get files from.
    work_repo_dead(&mut update);
    update.apply(git, work, "update (bidsflux indexer)").await.context("write the git-annex branch")?;
    // Only the commands that talk to the forge get its credentials.
    git.with_config(&project.git_config)
        .run(
            work,
            &[
                "push",
                "-q",
                "--atomic",
                &project.push_url,
                "refs/heads/main:refs/heads/main",
                "refs/heads/git-annex:refs/heads/git-annex",
            ],
        )
        .await
        .context("push session dataset")?;
    let commit = git.run(work, &["rev-parse", "HEAD"]).await.context("read the new commit")?.trim().to_owned();
    Ok(Indexed { dataset_id, commit, pushed: true })
}

/// The work repository, ready for the archive's files, or the commit that already has them.
enum Opened {
    AlreadyIndexed(Indexed),
    Ready { dataset_id: String, newest_generation: Option<u32> },
}

/// Creates the work repository: the project's history if it has one, else a new dataset.
async fn open(
    git: &Git,
    work: &Path,
    job: &IndexJob,
    project: &Project,
    files: &[(String, String)],
) -> anyhow::Result<Opened> {
    git.init_work_repo(work).await.context("create work repository")?;
    let remote_git = git.with_config(&project.git_config);
    let branches =
        remote_git.remote_branches(work, &project.push_url).await.context("list the branches of the forge project")?;
    if !branches.contains("main") {
        let dataset_id = dataset_id(&job.study).to_string();
        create_dataset(git, work, &dataset_id, files, "[DATALAD] new dataset").await?;
        return Ok(Opened::Ready { dataset_id, newest_generation: None });
    }
    let has_annex = branches.contains("git-annex");
    fetch(&remote_git, work, &project.push_url, has_annex).await?;
    if let Some(commit) = commit_with_trailer(git, work, "refs/remotes/origin/main", &job.archive.key).await? {
        let dataset_id = git
            .run(work, &["config", "--blob", &format!("{commit}:.datalad/config"), "datalad.dataset.id"])
            .await
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| dataset_id(&job.study).to_string());
        return Ok(Opened::AlreadyIndexed(Indexed { dataset_id, commit, pushed: false }));
    }
    // The index only: checking out would create a symlink per file (≈ 1 ms
    // each on a disk like this VM's), and the commit is made from the index.
    git.run(work, &["update-ref", "refs/heads/main", "refs/remotes/origin/main"])
        .await
        .context("take the existing dataset")?;
    git.run(work, &["read-tree", "HEAD"]).await.context("read the existing dataset")?;
    if has_annex {
        git.run(work, &["update-ref", "refs/heads/git-annex", "refs/remotes/origin/git-annex"])
            .await
            .context("take the existing git-annex branch")?;
    }
    let newest_generation = newest_generation_in(git, work).await?;
    let dataset_id = git
        .run(work, &["config", "--blob", "HEAD:.datalad/config", "datalad.dataset.id"])
        .await
        .context("read the dataset id of the existing dataset")?
        .trim()
        .to_owned();
    Ok(Opened::Ready { dataset_id, newest_generation })
}

/// Fetches `main` (and `git-annex` if `with_annex`) of `url` into `refs/remotes/origin/`.
pub(crate) async fn fetch(git: &Git, work: &Path, url: &str, with_annex: bool) -> anyhow::Result<()> {
    let mut args = vec!["fetch", "-q", "--no-tags", url, "+refs/heads/main:refs/remotes/origin/main"];
    if with_annex {
        args.push("+refs/heads/git-annex:refs/remotes/origin/git-annex");
    }
    git.run(work, &args).await.context("fetch the existing dataset")?;
    Ok(())
}

/// The newest commit of `rev` whose trailer names `archive_key`.
async fn commit_with_trailer(git: &Git, work: &Path, rev: &str, archive_key: &str) -> anyhow::Result<Option<String>> {
    let grep = format!("--grep={ARCHIVE_KEY_TRAILER}: {archive_key}");
    let format = format!("--format=%H %(trailers:key={ARCHIVE_KEY_TRAILER},valueonly,separator=%x20)");
    let out = git
        .run(work, &["log", "-F", &grep, &format, rev])
        .await
        .context("look for the archive in the dataset history")?;
    Ok(out.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let commit = words.next()?;
        words.any(|v| v == archive_key).then(|| commit.to_owned())
    }))
}

/// The highest generation indexed on the checked-out `main`.
async fn newest_generation_in(git: &Git, work: &Path) -> anyhow::Result<Option<u32>> {
    let format = format!("--format=%(trailers:key={GENERATION_TRAILER},valueonly,separator=%x20)");
    let out = git.run(work, &["log", &format, "HEAD"]).await.context("read the generations already indexed")?;
    Ok(out.split_whitespace().filter_map(|g| g.parse::<u32>().ok()).max())
}

/// Describes a new work repository on the git-annex branch, as `git annex
/// init` would, and marks it dead: it is deleted after the push.
pub(crate) fn work_repo_dead(update: &mut BranchUpdate) {
    let here = Uuid::new_v4().to_string();
    update.describe(&here, WORK_REPO_DESCRIPTION);
    update.dead(&here);
}

/// Writes and commits what `datalad create` writes, with `extra` files
/// (`.gitattributes` among them replaces DataLad's default), as `message`.
pub(crate) async fn create_dataset(
    git: &Git,
    work: &Path,
    id: &str,
    extra: &[(String, String)],
    message: &str,
) -> anyhow::Result<()> {
    let mut files = vec![
        (".datalad/config".to_owned(), format!("[datalad \"dataset\"]\n\tid = {id}\n")),
        (".datalad/.gitattributes".to_owned(), "config annex.largefiles=nothing\n".to_owned()),
    ];
    files.extend(extra.iter().filter(|(p, _)| !p.starts_with(".datalad/")).cloned());
    if !files.iter().any(|(p, _)| p == ".gitattributes") {
        files.push((".gitattributes".to_owned(), "* annex.backend=MD5E\n**/.git* annex.largefiles=nothing\n".into()));
    }
    let mut paths = Vec::with_capacity(files.len());
    for (path, content) in files {
        let file = work.join(&path);
        if let Some(parent) = file.parent() {
            tokio::fs::create_dir_all(parent).await.with_context(|| format!("create {}", parent.display()))?;
        }
        tokio::fs::write(&file, content).await.with_context(|| format!("write {}", file.display()))?;
        paths.push(path);
    }
    let mut add = vec!["add", "-f", "--"];
    add.extend(paths.iter().map(String::as_str));
    git.run(work, &add).await.context("stage dataset configuration")?;
    git.run(work, &["commit", "-q", "-m", message]).await.context("commit new dataset")?;
    Ok(())
}

/// Stages every DICOM (and the archive if `with_archive`) as annexed
/// symlinks, the ones `git annex fromkey` would make, with git plumbing: their
/// blobs are written by one `git fast-import` and staged by one
/// `git update-index --index-info` (an amendment's file replaces the entry).
/// Only the index gets them: the commit is made from it and the work tree is
/// deleted after the push, and creating 1000 symlinks costs ≈ 1 s on a disk
/// like this VM's. (`fromkey --batch` took half of a 1000-file session.)
async fn add_files(git: &Git, work: &Path, job: &IndexJob, with_archive: bool) -> anyhow::Result<()> {
    let entries: Vec<(String, String)> = with_archive
        .then(|| (job.archive.key.clone(), job.archive.name.clone()))
        .into_iter()
        .chain(job.files.iter().map(|f| (f.key.clone(), f.dataset_path.clone())))
        .collect();
    let links: Vec<(String, String)> =
        entries.iter().map(|(key, path)| (path.clone(), symlink_target(key, path))).collect();

    // One blob per link target (the content of a symlink in git), numbered by marks.
    let mut stream = Vec::with_capacity(links.len() * 160);
    for (i, (_, target)) in links.iter().enumerate() {
        stream.extend_from_slice(format!("blob\nmark :{}\ndata {}\n", i + 1, target.len()).as_bytes());
        stream.extend_from_slice(target.as_bytes());
        stream.push(b'\n');
    }
    stream.extend_from_slice(b"done\n");
    let marks = work.join(".git").join("bidsflux-symlink-marks");
    let export = format!("--export-marks={}", marks.display());
    git.run_input(work, &["fast-import", "--quiet", "--done", &export], stream)
        .await
        .context("write the symlink blobs")?;
    let text = tokio::fs::read_to_string(&marks).await.context("read the symlink blob ids")?;
    let mut ids = BTreeMap::new();
    for line in text.lines() {
        if let Some((mark, id)) = line.strip_prefix(':').and_then(|l| l.split_once(' ')) {
            ids.insert(mark.parse::<usize>().context("read the symlink blob ids")?, id.to_owned());
        }
    }
    let mut index = Vec::with_capacity(links.len() * 120);
    for (i, (path, _)) in links.iter().enumerate() {
        let id = ids.get(&(i + 1)).with_context(|| format!("no blob id for {path}"))?;
        index.extend_from_slice(format!("120000 {id} 0\t{path}").as_bytes());
        index.push(0);
    }
    git.run_input(work, &["update-index", "-z", "--index-info"], index).await.context("stage annexed files")?;
    Ok(())
}

/// What `git annex fromkey` points a locked file at: `../` per directory of
/// `path`, then `.git/annex/objects/<hashdirmixed>/<key>/<key>`.
fn symlink_target(key: &str, path: &str) -> String {
    let up = "../".repeat(path.matches('/').count());
    format!("{up}.git/annex/objects/{}{key}/{key}", hash_dir_mixed(key))
}

/// What the git-annex branch must say about this archive and its files.
fn branch_update(job: &IndexJob) -> BranchUpdate {
    let s3 = &job.s3;
    let s3_uuid = s3_remote_uuid(s3).to_string();
    let mut update = BranchUpdate::new(Timestamp::now());
    let mut config = BTreeMap::from([
        ("autoenable", "true".to_owned()),
        ("bucket", s3.bucket.clone()),
        ("chunk", "1GiB".to_owned()),
        ("datacenter", s3.datacenter.clone()),
        ("encryption", "none".to_owned()),
        ("fileprefix", s3.fileprefix.clone()),
        ("host", s3.host.clone()),
        ("name", S3_REMOTE_NAME.to_owned()),
        ("port", s3.port.to_string()),
        ("protocol", s3.protocol.as_str().to_owned()),
        ("storageclass", "STANDARD".to_owned()),
        ("type", "S3".to_owned()),
    ]);
    if s3.path_style {
        config.insert("requeststyle", "path".to_owned());
    }
    update.describe(&s3_uuid, S3_REMOTE_NAME);
    update.remote(&s3_uuid, &config);
    update.wanted(&s3_uuid, ARCHIVES_WANTED);
    let archives = BTreeMap::from([
        ("autoenable", "true".to_owned()),
        ("encryption", "none".to_owned()),
        ("externaltype", "datalad-archives".to_owned()),
        ("name", "datalad-archives".to_owned()),
        ("type", "external".to_owned()),
    ]);
    update.describe(DATALAD_ARCHIVES_UUID, "datalad-archives");
    update.remote(DATALAD_ARCHIVES_UUID, &archives);
    update.present(&job.archive.key, &s3_uuid);
    for f in &job.files {
        update.present(&f.key, DATALAD_ARCHIVES_UUID);
        update.url(&f.key, &format!(":dl+archive:{}#path={}&size={}", job.archive.key, f.archive_path, f.size));
    }
    update
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Protocol;

    #[test]
    fn ids_are_stable() {
        let study = Uid::parse("x", "1.2.3.4").unwrap();
        assert_eq!(dataset_id(&study), dataset_id(&study));
        assert_eq!(dataset_id(&study).get_version_num(), 5);
        assert_ne!(dataset_id(&study), dataset_id(&Uid::parse("x", "1.2.3.5").unwrap()));
    }

    #[test]
    fn the_s3_remote_uuid_ignores_the_endpoint() {
        let remote = |host: &str, port, protocol, fileprefix: &str| S3Remote {
            host: host.into(),
            port,
            protocol,
            bucket: "dicoms".into(),
            fileprefix: fileprefix.into(),
            path_style: true,
            datacenter: "US".into(),
        };
        let a = s3_remote_uuid(&remote("127.0.0.1", 9000, Protocol::Http, "PI/1.2.3/"));
        assert_eq!(a, s3_remote_uuid(&remote("s3.example.org", 443, Protocol::Https, "PI/1.2.3/")));
        assert_ne!(a, s3_remote_uuid(&remote("127.0.0.1", 9000, Protocol::Http, "PI/1.2.4/")));
        let mut other_bucket = remote("127.0.0.1", 9000, Protocol::Http, "PI/1.2.3/");
        other_bucket.bucket = "dicoms2".into();
        assert_ne!(a, s3_remote_uuid(&other_bucket));
    }

    /// The links written with plumbing are the ones `git annex fromkey` makes.
    #[tokio::test]
    async fn symlinks_are_those_of_git_annex_fromkey() {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &'static [&'static str], input: &'static str| {
            let dir = dir.path().to_path_buf();
            async move {
                let mut child = tokio::process::Command::new("git")
                    .args(args)
                    .current_dir(&dir)
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut stdin = child.stdin.take().unwrap();
                tokio::io::AsyncWriteExt::write_all(&mut stdin, input.as_bytes()).await.unwrap();
                drop(stdin);
                assert!(child.wait().await.unwrap().success(), "git {args:?}");
            }
        };
        run(&["init", "-q"], "").await;
        run(&["annex", "init", "-q", "probe"], "").await;
        let keys = [
            ("MD5E-s8000--0123456789abcdef0123456789abcdef.dcm", "1.2.3/4.5.6.dcm"),
            ("MD5E-s12--00000000000000000000000000000001.7z", "1.2.3.7z"),
            ("MD5E-s99--ffffffffffffffffffffffffffffffff.dcm", "a/b/c.dcm"),
        ];
        run(
            &["annex", "fromkey", "--force", "--batch", "--quiet"],
            "MD5E-s8000--0123456789abcdef0123456789abcdef.dcm 1.2.3/4.5.6.dcm\n\
             MD5E-s12--00000000000000000000000000000001.7z 1.2.3.7z\n\
             MD5E-s99--ffffffffffffffffffffffffffffffff.dcm a/b/c.dcm\n",
        )
        .await;
        for (key, path) in keys {
            let link = std::fs::read_link(dir.path().join(path)).unwrap();
            assert_eq!(link.to_str().unwrap(), symlink_target(key, path), "{path}");
        }
    }
}
