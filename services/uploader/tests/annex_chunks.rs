//! The object key contract with git-annex for archives larger than the S3 remote's `chunk`.
//!
//! The datasets' S3 special remote says `chunk=1GiB` (as the original's), but the uploader stores
//! every archive as one object at `<fileprefix><key>` whatever its size, and the indexer writes
//! no chunk log. git-annex then tries the chunked layouts its chunk log lists (none) and the
//! unchunked key, so `git annex get` finds the archive. This runs that with real git-annex and a
//! remote whose chunk (1 MiB) is smaller than the archive (7 MiB, sent as a multipart upload), against the uploader's own
//! `Store::put_archive`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use tokio::process::Command;

use bidsflux_config::Env;
use bidsflux_session::Uid;
use bidsflux_session::annex::md5e_key;
use bidsflux_testsupport::S3Server;
use bidsflux_testsupport::dicom::{StudySpec, generate_study};
use bidsflux_uploader::s3::Store;
use bidsflux_uploader::spool::{self, SpoolFile};

/// Runs git asynchronously: the S3 server answers on this test's runtime.
async fn git(dir: &Path, s3: &S3Server, args: &[&str]) -> String {
    let out = Command::new("git").args(args).current_dir(dir).envs(s3.annex_user_env()).output().await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "git {args:?} failed:\n{text}\nS3 requests: {:?}", s3.requests());
    text
}

#[tokio::test]
async fn git_annex_gets_an_archive_larger_than_the_chunk_size() {
    let s3 = S3Server::start().await.unwrap();
    let spool = tempfile::tempdir().unwrap();
    let study =
        generate_study(spool.path(), &StudySpec { series: 1, instances_per_series: 1, ..Default::default() }).unwrap();
    let file = SpoolFile {
        rel_path: study.files[0].strip_prefix(spool.path()).unwrap().to_string_lossy().into_owned(),
        series_instance_uid: Uid::parse("s", &study.series_instance_uids[0]).unwrap(),
        sop_instance_uid: Uid::parse("s", "1.2.3").unwrap(),
    };
    let uid = Uid::parse("study", &study.study_instance_uid).unwrap();
    let env = Env::from_pairs([
        ("S3_URL_PATTERN", format!("s3://{}/chunk-test/sourcedata", s3.addr)),
        ("AWS_ENDPOINT_URL", s3.endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        // Below the archive's size: a multipart upload, as for a real > 1 GiB archive.
        ("BIDSFLUX_S3_PART_SIZE", "5MiB".to_owned()),
    ]);
    let config = bidsflux_uploader::Config::from_env(&env).unwrap();
    let metas = spool::read_metas(spool.path(), &file, &uid).unwrap();
    let placement = config.s3_url_pattern.place(&metas).unwrap();

    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join(format!("{uid}.7z"));
    let bytes: Vec<u8> =
        (0..7 * 1024 * 1024 + 12_345_u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(&archive, &bytes).unwrap();
    let digests = spool::hash_file(&archive).unwrap();
    let key = md5e_key(digests.size, &digests.md5, &format!("{uid}.7z"));

    let repo = work.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &s3, &["init", "-q"]).await;
    git(&repo, &s3, &["annex", "init", "-q", "test"]).await;
    let (host, port) = (s3.addr.ip().to_string(), s3.addr.port().to_string());
    git(
        &repo,
        &s3,
        &[
            "annex",
            "initremote",
            "s3",
            "type=S3",
            "encryption=none",
            "chunk=1MiB",
            "requeststyle=path",
            "protocol=http",
            &format!("host={host}"),
            &format!("port={port}"),
            &format!("bucket={}", placement.bucket),
            &format!("fileprefix={}", placement.fileprefix),
        ],
    )
    .await;
    // The uploader stores the archive after the remote exists: git-annex's initremote creates
    // the bucket itself, and cannot read the embedded server's answer when it is already there
    // (s3s-fs's 409 error has no <Message>; MinIO's has).
    Store::new(&config).put_archive(&placement, &placement.key(&key), &archive, &digests).await.unwrap();
    assert!(s3.requests().iter().any(|r| r.starts_with("POST") && r.contains("?uploads")), "{:?}", s3.requests());
    let uuid = git(&repo, &s3, &["config", "remote.s3.annex-uuid"]).await.trim().to_owned();
    git(&repo, &s3, &["annex", "setpresentkey", &key, &uuid, "1"]).await;
    let whereis = git(&repo, &s3, &["annex", "whereis", "--key", &key]).await;
    assert!(whereis.contains("s3"), "{whereis}");
    git(&repo, &s3, &["annex", "get", "--key", &key, "--from", "s3"]).await;
    let location = git(&repo, &s3, &["annex", "contentlocation", &key]).await;
    let got = std::fs::read(repo.join(location.trim())).unwrap();
    assert!(got == bytes, "git annex get returned other bytes");
    // No chunk objects exist: git-annex read the single object the uploader stored.
    assert!(
        !s3.requests().iter().any(|r| r.contains("-S1048576-C")),
        "git-annex went for chunk keys: {:?}",
        s3.requests()
    );
}
