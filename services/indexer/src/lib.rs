//! The indexer: turns each archived study into a DataLad session dataset in
//! the forge, without downloading the archive.
//!
//! It consumes `ArchiveStored` (durable consumer `indexer` on
//! `BIDSFLUX_V1_ARCHIVES`, a work queue shared by replicas), builds the
//! dataset natively with git + git-annex plumbing ([`dataset`],
//! [`annex_branch`]), pushes it to the forge ([`forge`]: a local directory, or
//! GitLab with [`gitlab_forge`]) at
//! `<group>/sourcedata/dicoms/<StudyInstanceUID>` and publishes
//! `StudyIndexed`. A clone gets any DICOM with `datalad get`: git-annex asks
//! DataLad's archives remote, which fetches the archive from the S3 special
//! remote and extracts the file.
//!
//! Failures of git, git-annex or the forge are retried; messages whose
//! values cannot be used (bad UIDs, hostile paths, a group template that does
//! not render) are dead-lettered as invalid input. Each replica serves
//! `/healthz` and `/metrics` ([`metrics`]) on `BIDSFLUX_INDEXER_HTTP_BIND`.

pub mod annex_branch;
pub mod config;
pub mod dataset;
pub mod forge;
pub mod git;
pub mod gitlab_forge;
pub mod job;
pub mod metrics;
pub mod superdataset;
pub mod templates;

mod handler;

use std::sync::Arc;

use anyhow::Context as _;
use bidsflux_messaging::topology::Requirement;
use bidsflux_messaging::{Bus, ConsumerOptions, run_consumer, subjects};
use bidsflux_service::tasks::SHUTDOWN_GRACE;
use bidsflux_service::{Tasks, WorkDir, listen};
use tokio_util::sync::CancellationToken;

pub use config::{Config, ForgeConfig};
use forge::{Forge, LocalForge};
use git::{Git, Identity};
use gitlab_forge::GitlabForge;
use handler::Indexer;
use metrics::Metrics;

/// The JetStream objects the indexer needs.
pub const REQUIRES: &[Requirement] = &[
    Requirement::Consumer { stream: subjects::STREAM_ARCHIVES, name: subjects::CONSUMER_INDEXER },
    Requirement::Stream(subjects::STREAM_INDEXED),
    Requirement::Stream(subjects::STREAM_DEADLETTER),
    Requirement::ObjectStore(subjects::OBJ_MANIFESTS),
];

/// Runs the indexer until `shutdown` is cancelled.
pub async fn run(config: Config, bus: Bus, shutdown: CancellationToken) -> anyhow::Result<()> {
    let http = listen::bind_optional(config.http_bind, config::HTTP_BIND_VAR).await?;
    // This replica's own scratch directory in the work directory replicas share; what killed
    // replicas left there is removed, never a live replica's files.
    let work = WorkDir::claim_at_start(&config.work_dir, "indexer")?;
    let mut config = config;
    config.work_dir = work.path().to_owned();
    let identity = Identity { name: config.bot_username.clone(), email: config.bot_email.clone() };
    let git = Git::new(&config.git, identity, config.git_timeout);
    let version = git
        .run(&config.work_dir, &["annex", "version", "--raw"])
        .await
        .context("run git-annex (BIDSFLUX_GIT must be a git with git-annex installed)")?;
    tracing::info!(git_annex = version.trim(), "git-annex found");
    match &config.forge {
        ForgeConfig::Local { dir } => {
            tokio::fs::create_dir_all(dir)
                .await
                .with_context(|| format!("create BIDSFLUX_FORGE_DIR {}", dir.display()))?;
            let forge = LocalForge::new(dir, git.clone());
            serve(config, bus, http, shutdown, git, forge).await
        }
        ForgeConfig::Gitlab(gitlab) => {
            let key_file = match &gitlab.transport {
                config::GitTransport::Ssh(ssh) => {
                    write_ssh_key(&ssh.key_file, ssh.key.expose())
                        .await
                        .with_context(|| format!("write the GitLab SSH key to {}", ssh.key_file.display()))?;
                    tracing::info!(host = ssh.host, port = ssh.port, "git reaches GitLab over SSH");
                    Some(ssh.key_file.clone())
                }
                config::GitTransport::Https => None,
            };
            // Contacts GitLab only when the first study arrives: the indexer
            // starts (and its consumer waits) while GitLab is down.
            tracing::info!(url = gitlab.url, bot = gitlab.bot_username, "using the GitLab forge");
            let forge = GitlabForge::new(gitlab.clone());
            let result = serve(config, bus, http, shutdown, git, forge).await;
            // The key does not outlive the process on the shared work directory.
            if let Some(file) = key_file {
                let _ = tokio::fs::remove_file(file).await;
            }
            result
        }
    }
}

/// Writes the bot's SSH key readable by this user only (ssh refuses a key
/// others can read; docker secrets are mode 0444).
async fn write_ssh_key(path: &std::path::Path, key: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let (path, key) = (path.to_path_buf(), key.to_owned());
    tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        // A name of its own (random), created with mode 0600 from the start.
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        std::io::Write::write_all(&mut f, key.as_bytes())
    })
    .await
    .map_err(std::io::Error::other)?
}

async fn serve<F: Forge>(
    config: Config,
    bus: Bus,
    http: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
    git: Git,
    forge: F,
) -> anyhow::Result<()> {
    let tasks = Tasks::new(&shutdown);
    let metrics = Arc::new(Metrics::default());
    bidsflux_service::http::spawn(&tasks, http, Arc::new(bus.clone()), metrics.clone());
    let indexer = Arc::new(Indexer {
        bus: bus.clone(),
        git,
        forge,
        work_dir: config.work_dir.clone(),
        group_template: config.group_template.clone(),
        session_name_template: config.session_name_template.clone(),
        templates: config.templates.clone(),
        ni_dataops_root: config.ni_dataops_root.clone(),
        bids_dev_branch: config.bids_dev_branch.clone(),
        bids_base_branch: config.bids_base_branch.clone(),
        bids_ready: std::sync::Mutex::default(),
        metrics,
    });
    let mut opts = ConsumerOptions::new(subjects::STREAM_ARCHIVES, subjects::CONSUMER_INDEXER);
    opts.concurrency = config.concurrency;
    // Jobs take seconds to minutes: replicas share the queue message by message.
    opts.pull_batch = config.concurrency;
    let consumed = run_consumer(bus, opts, shutdown, handler::study_of, move |d| {
        let indexer = Arc::clone(&indexer);
        async move { indexer.handle(d).await }
    })
    .await;
    tasks.stop(SHUTDOWN_GRACE).await;
    consumed
}
