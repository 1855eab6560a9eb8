//! A study in a temp spool, real NATS and S3 servers, and the uploader
//! running in-process through `run`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use bidsflux_config::Env;
use bidsflux_messaging::{Bus, subjects};
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::{StudySpec, generate_study};
use bidsflux_testsupport::{NatsServer, S3Server, wait_until};
use dicom_dictionary_std::tags;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// A study written into a spool in the receiver's layout.
pub struct SpooledStudy {
    /// StudyInstanceUID.
    pub uid: String,
    /// Paths relative to the spool root, sorted.
    pub rel_paths: Vec<String>,
}

/// Generates a 2×5 study with `spec` and places its files as the receiver would.
pub fn spool_study(spool: &Path, spec: StudySpec) -> SpooledStudy {
    spool_study_sized(spool, &StudySpec { series: 2, instances_per_series: 5, ..spec })
}

/// Generates a study exactly as `spec` says and moves its files into the
/// spool as the receiver would (moved, not copied: large studies stay on disk once).
pub fn spool_study_sized(spool: &Path, spec: &StudySpec) -> SpooledStudy {
    let generated = tempfile::tempdir_in(spool).unwrap();
    let study = generate_study(generated.path(), spec).unwrap();
    let mut rel_paths = Vec::new();
    for f in &study.files {
        let obj = dicom_object::OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(f).unwrap();
        let text = |tag| obj.element(tag).unwrap().to_str().unwrap().trim_end_matches(['\0', ' ']).to_owned();
        let rel = format!(
            "{}/{}/{}.dcm",
            text(tags::STUDY_INSTANCE_UID),
            text(tags::SERIES_INSTANCE_UID),
            text(tags::SOP_INSTANCE_UID)
        );
        let dest = spool.join(&rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::rename(f, &dest).unwrap();
        rel_paths.push(rel);
    }
    rel_paths.sort();
    SpooledStudy { uid: study.study_instance_uid, rel_paths }
}

/// Every file under `dir` with its bytes and modification time (to prove nothing changed).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let meta = std::fs::metadata(&p).unwrap();
                out.insert(p.clone(), (std::fs::read(&p).unwrap(), meta.modified().unwrap()));
            }
        }
    }
    out
}

/// Servers, directories and a running uploader.
pub struct Harness {
    pub nats: NatsServer,
    pub s3: S3Server,
    pub bus: Bus,
    pub spool: tempfile::TempDir,
    pub work: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Harness {
    /// Starts NATS (with the topology) and S3; the uploader is started by [`Harness::run_uploader`].
    pub async fn start() -> Self {
        bidsflux_telemetry::init_for_tests();
        let nats = NatsServer::start().await.unwrap();
        let s3 = S3Server::start().await.unwrap();
        let bus = Bus::connect(&nats.url, "uploader", Duration::from_secs(10)).await.unwrap();
        bidsflux_messaging::topology::declare(&bus.js).await.unwrap();
        Self {
            nats,
            s3,
            bus,
            spool: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
            shutdown: CancellationToken::new(),
            task: None,
        }
    }

    /// The uploader's environment for bucket pattern `pattern` (`{host}` is replaced by the S3 server's address).
    pub fn env(&self, pattern: &str) -> Env {
        Env::from_pairs([
            ("NATS_URL", self.nats.url.clone()),
            ("BIDSFLUX_SPOOL_DIR", self.spool.path().display().to_string()),
            ("BIDSFLUX_WORK_DIR", self.work.path().join("work").display().to_string()),
            ("S3_URL_PATTERN", pattern.replace("{host}", &self.s3.addr.to_string())),
            ("AWS_ENDPOINT_URL", self.s3.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", self.s3.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.s3.secret_key.clone()),
            ("BIDSFLUX_S3_MAX_ATTEMPTS", "2".to_owned()),
            ("BIDSFLUX_UPLOADER_HTTP_BIND", "127.0.0.1:0".to_owned()),
        ])
    }

    /// Runs the uploader in-process with `env`.
    pub async fn run_uploader(&mut self, env: &Env) {
        let config = bidsflux_uploader::Config::from_env(env).unwrap();
        let bus = Bus::connect(&self.nats.url, "uploader", Duration::from_secs(10)).await.unwrap();
        self.task = Some(tokio::spawn(bidsflux_uploader::run(config, bus, self.shutdown.clone())));
    }

    /// Publishes a `StudyCompleted` for `study` with message id `msg_id`.
    pub async fn complete(&self, study: &SpooledStudy, instance_count: u64, msg_id: &str) -> pb::StudyCompleted {
        let msg = pb::StudyCompleted {
            study_instance_uid: study.uid.clone(),
            generation: 0,
            reason: Some(pb::CompletionReason {
                rule: "default".into(),
                criterion: pb::CompletionCriterion::QuietPeriod.into(),
                detail: "quiet 1s".into(),
            }),
            series_count: 2,
            instance_count,
            spool_study_dir: study.uid.clone(),
            ..Default::default()
        };
        self.bus.publish(subjects::STUDY_COMPLETED, &msg, Some(msg_id)).await.unwrap();
        msg
    }

    /// The first `n` messages on `subject` in `stream`, read with an ordered consumer.
    pub async fn read<M: prost::Message + Default>(&self, stream: &str, subject: &str, n: usize) -> Vec<M> {
        let st = self.bus.js.get_stream(stream).await.unwrap();
        let consumer = st
            .create_consumer(OrderedConfig {
                filter_subject: subject.to_owned(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            let m = tokio::time::timeout(Duration::from_secs(20), messages.next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {subject} #{}", out.len() + 1))
                .unwrap()
                .unwrap();
            out.push(M::decode(m.payload.as_ref()).unwrap());
        }
        out
    }

    /// Messages stored in `stream` right now.
    pub async fn count(&self, stream: &str) -> u64 {
        let mut st = self.bus.js.get_stream(stream).await.unwrap();
        st.info().await.unwrap().state.messages
    }

    /// Waits until the uploader's durable consumer has finished `n` messages (acked or terminated).
    pub async fn wait_handled(&self, n: u64) {
        let js = self.bus.js.clone();
        wait_until("the uploader to finish its messages", Duration::from_secs(25), || {
            let js = js.clone();
            async move {
                let st = js.get_stream(subjects::STREAM_STUDIES).await.ok()?;
                let info = st.consumer_info(subjects::CONSUMER_UPLOADER).await.ok()?;
                (info.ack_floor.stream_sequence >= n && info.num_ack_pending == 0).then_some(())
            }
        })
        .await
        .unwrap();
    }

    /// Stops the uploader and checks that it stopped cleanly.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t).await.unwrap().unwrap().unwrap();
        }
    }

    /// Entries left in the work directory (temp archives must be gone): what the uploader's
    /// claimed scratch directories hold besides their lock.
    pub fn work_leftovers(&self) -> Vec<PathBuf> {
        let Ok(claims) = std::fs::read_dir(self.work.path().join("work")) else { return Vec::new() };
        let mut out = Vec::new();
        for claim in claims {
            let claim = claim.unwrap().path();
            for e in std::fs::read_dir(&claim).unwrap() {
                let p = e.unwrap().path();
                if p.file_name().is_some_and(|n| n != ".lock") {
                    out.push(p);
                }
            }
        }
        out
    }
}
