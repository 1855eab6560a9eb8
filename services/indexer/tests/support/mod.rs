//! Shared set-up of the indexer tests: real nats-server, real S3 server, a
//! real 7z archive of a synthetic study, and the indexer run in-process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_indexer::{Config, run};
use bidsflux_messaging::{Bus, subjects, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_session::annex::md5e_key;
use bidsflux_testsupport::dicom::{self, StudySpec};
use bidsflux_testsupport::{NatsServer, S3Server};
use md5::{Digest as _, Md5};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// The bucket archives are put in.
pub const BUCKET: &str = "dicoms";

/// The uploader's S3 endpoint in the messages: a name that resolves nowhere
/// (`.invalid`), as `http://minio:9000` does not outside a swarm.
pub const INTERNAL_ENDPOINT: &str = "http://minio.invalid:9000";

/// A running indexer with its servers and directories.
pub struct Harness {
    pub nats: NatsServer,
    pub s3: S3Server,
    pub bus: Bus,
    pub tmp: tempfile::TempDir,
    pub forge_dir: PathBuf,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    /// Starts NATS (with the topology), S3 and the indexer.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Like [`Harness::start`], with more indexer settings (e.g. a group template).
    pub async fn start_with(settings: &[(&str, &str)]) -> Self {
        bidsflux_telemetry::init_for_tests();
        let nats = NatsServer::start().await.unwrap();
        let s3 = S3Server::start().await.unwrap();
        std::fs::create_dir_all(s3.root().join(BUCKET)).unwrap();
        let bus = Bus::connect(&nats.url, "indexer", Duration::from_secs(5)).await.unwrap();
        topology::declare(&bus.js).await.unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let forge_dir = tmp.path().join("forge");
        let work_dir = tmp.path().join("work");
        let mut env = Env::from_pairs([
            ("NATS_URL", nats.url.as_str()),
            ("BIDSFLUX_WORK_DIR", work_dir.to_str().unwrap()),
            ("BIDSFLUX_FORGE", "local"),
            ("BIDSFLUX_FORGE_DIR", forge_dir.to_str().unwrap()),
            ("BIDSFLUX_INDEXER_HTTP_BIND", "127.0.0.1:0"),
        ]);
        for &(k, v) in settings {
            env = env.with(k, v);
        }
        let config = Config::from_env(&env).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(config, bus.clone(), stop.clone()));
        Self { nats, s3, bus, tmp, forge_dir, stop, task }
    }

    /// Like [`Harness::start_with`], pushing to the fake GitLab `fake` with `token`.
    pub async fn start_gitlab(fake: &bidsflux_fake_gitlab::FakeGitlab, token: &str, more: &[(&str, &str)]) -> Self {
        let url = fake.url();
        let mut settings = vec![("BIDSFLUX_FORGE", "gitlab"), ("GITLAB_URL", url.as_str()), ("GITLAB_TOKEN", token)];
        settings.extend_from_slice(more);
        Self::start_with(&settings).await
    }

    /// Stops the indexer and checks it ended cleanly.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// DICOM files of one study, as the spool would hold them.
#[derive(Clone)]
pub struct StudyFiles {
    pub study: String,
    pub spec: StudySpec,
    /// `(<study>/<series>/<sop>.dcm, SeriesInstanceUID, SOPInstanceUID, bytes)`.
    pub files: Vec<(String, String, String, Vec<u8>)>,
}

impl StudyFiles {
    /// Generates a study (`spec.series` × `spec.instances_per_series`); with
    /// `spec.study_instance_uid` set, more series of an existing study.
    pub fn generate(h: &Harness, spec: StudySpec) -> Self {
        let dir = h.tmp.path().join(format!("generated-{}", dicom::new_uid()));
        let generated = dicom::generate_study(&dir, &spec).unwrap();
        let study = generated.study_instance_uid.clone();
        let mut files = Vec::new();
        for file in &generated.files {
            // Files are named s<series number>_i<instance>.dcm.
            let name = file.file_name().unwrap().to_str().unwrap();
            let series_index: usize = name[1..3].parse().unwrap();
            let series = generated.series_instance_uids[series_index - 1].clone();
            let sop = dicom::sop_instance_uid(file).unwrap();
            files.push((format!("{study}/{series}/{sop}.dcm"), series, sop, std::fs::read(file).unwrap()));
        }
        Self { study, spec, files }
    }
}

/// A study archived like the uploader does, and its `ArchiveStored`.
pub struct Archived {
    pub message: pb::ArchiveStored,
    /// Original bytes by dataset path (`<series>/<sop>.dcm`).
    pub originals: BTreeMap<String, Vec<u8>>,
}

/// Generates a study and archives it (generation 0).
pub async fn archive_study(h: &Harness, spec: StudySpec) -> Archived {
    archive(h, &StudyFiles::generate(h, spec), 0).await
}

/// Builds `<study>.7z` of `study` like the uploader, puts it in the S3 server
/// and describes it in an `ArchiveStored`.
pub async fn archive(h: &Harness, study: &StudyFiles, generation: u32) -> Archived {
    let layout = h.tmp.path().join(format!("layout-{}", dicom::new_uid()));
    let mut manifest = Vec::new();
    let mut originals = BTreeMap::new();
    for (rel, series, sop, bytes) in &study.files {
        let dest = layout.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(&dest, bytes).unwrap();
        manifest.push(pb::ManifestEntry {
            path: rel.clone(),
            size: bytes.len() as u64,
            md5: hex::encode(Md5::digest(bytes)),
            sha256: String::new(),
            sop_instance_uid: sop.clone(),
            series_instance_uid: series.clone(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".into(),
        });
        originals.insert(format!("{series}/{sop}.dcm"), bytes.clone());
    }
    let uid = &study.study;
    let archive_name = format!("{uid}.7z");
    let out = Command::new("7z")
        .args(["a", "-t7z", "-mx5", "-ms=off", &archive_name, uid])
        .current_dir(&layout)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "7z failed: {}", String::from_utf8_lossy(&out.stderr));
    let archive = std::fs::read(layout.join(&archive_name)).unwrap();
    let md5 = hex::encode(Md5::digest(&archive));
    let key = md5e_key(archive.len() as u64, &md5, &archive_name);
    let fileprefix = format!("Investigator/Study1/{uid}/");
    let object = h.s3.root().join(BUCKET).join(format!("{fileprefix}{key}"));
    std::fs::create_dir_all(object.parent().unwrap()).unwrap();
    std::fs::write(&object, &archive).unwrap();
    let spec = &study.spec;
    let metas = pb::SessionMetas {
        study_instance_uid: uid.clone(),
        patient_id: spec.patient_id.clone(),
        patient_name: spec.patient_name.clone(),
        referring_physician_name: spec.referring_physician_name.clone(),
        study_date: "20261127".into(),
        study_description: spec.study_description.clone(),
    };
    let message = pb::ArchiveStored {
        study_instance_uid: uid.clone(),
        generation,
        metas: Some(metas),
        location: Some(pb::S3Location {
            // What the uploader uses inside a swarm: resolvable only there. The
            // dataset must point at the public URL instead.
            endpoint_url: INTERNAL_ENDPOINT.into(),
            public_url: h.s3.endpoint.clone(),
            region: "us-east-1".into(),
            bucket: BUCKET.into(),
            fileprefix: fileprefix.clone(),
            key: format!("{fileprefix}{key}"),
            path_style: true,
        }),
        archive_name,
        size: archive.len() as u64,
        md5,
        sha256: String::new(),
        annex_key: key,
        manifest,
        reason: None,
        manifest_ref: None,
    };
    Archived { message, originals }
}

/// Runs `git` in `dir`, returning trimmed stdout; panics on failure.
pub async fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").args(args).current_dir(dir).output().await.unwrap();
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The DataLad executable (the compatibility oracle); tests fail without it.
pub fn datalad() -> PathBuf {
    if bidsflux_testsupport::have_program("datalad") {
        return PathBuf::from("datalad");
    }
    let shim = PathBuf::from("/root/.pyenv/shims/datalad");
    assert!(shim.is_file(), "DataLad is required for this test (pip install datalad)");
    shim
}

/// Runs DataLad in `dir` as a user of the S3 server would: its credentials,
/// loopback allowed for git-annex, DataLad's special remotes on PATH.
pub async fn run_datalad(h: &Harness, dir: &Path, args: &[&str]) -> Output {
    let program = datalad();
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(bin) = program.parent().filter(|p| !p.as_os_str().is_empty()) {
        path = std::env::join_paths(std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&path))).unwrap();
    }
    let out = Command::new(&program)
        .args(args)
        .current_dir(dir)
        .env("PATH", path)
        .envs(h.s3.annex_user_env())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "datalad {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Publishes an `ArchiveStored` (no message id: each publish is a new delivery).
pub async fn publish(h: &Harness, msg: &pb::ArchiveStored) {
    h.bus.publish(subjects::ARCHIVE_STORED, msg, None).await.unwrap();
}

/// The next `StudyIndexed` on `sub` (40 s at most).
pub async fn next_indexed(sub: &mut async_nats::Subscriber) -> pb::StudyIndexed {
    let msg = tokio::time::timeout(Duration::from_secs(40), futures::StreamExt::next(sub))
        .await
        .expect("no StudyIndexed within 40 s")
        .expect("subscription closed");
    prost::Message::decode(msg.payload.as_ref()).unwrap()
}

/// The next dead letter on `sub` (30 s at most).
pub async fn next_dead_letter(sub: &mut async_nats::Subscriber) -> pb::DeadLetter {
    let msg = tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(sub))
        .await
        .expect("no dead letter within 30 s")
        .expect("subscription closed");
    prost::Message::decode(msg.payload.as_ref()).unwrap()
}

/// An indexer process (the binary, as a swarm replica runs) on the harness's
/// NATS and forge (or the forge `settings` give), with its own work directory;
/// killed on drop.
pub fn spawn_replica(h: &Harness, work: &Path, settings: &[(&str, &str)]) -> tokio::process::Child {
    std::fs::create_dir_all(work).unwrap();
    Command::new(env!("CARGO_BIN_EXE_bidsflux-indexer"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env("NATS_URL", &h.nats.url)
        .env("BIDSFLUX_WORK_DIR", work)
        .env("BIDSFLUX_FORGE", "local")
        .env("BIDSFLUX_FORGE_DIR", &h.forge_dir)
        .env("BIDSFLUX_INDEXER_CONCURRENCY", "1")
        .env("BIDSFLUX_INDEXER_HTTP_BIND", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(settings.iter().copied())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits until `n` pull requests wait on the indexer's consumer.
pub async fn replicas_pulling(h: &Harness, n: usize) {
    bidsflux_testsupport::wait_until("replicas pulling", Duration::from_secs(30), || async {
        let s = h.bus.js.get_stream(subjects::STREAM_ARCHIVES).await.ok()?;
        let waiting = s.consumer_info(subjects::CONSUMER_INDEXER).await.ok()?.num_waiting;
        (waiting >= n).then_some(())
    })
    .await
    .unwrap();
}
