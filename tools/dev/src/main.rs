//! `bidsflux-dev` (`make dev`): runs the whole pipeline locally on embedded defaults.
//!
//! Starts Debian's `nats-server` and an embedded S3 server on loopback ports,
//! provisions the bus, runs the five services with the local forge, listens
//! for DICOM on `127.0.0.1:${BIDSFLUX_DICOM_PORT:-11112}` (AE title
//! `BIDSFLUX`), writes `<data dir>/dev.env`, and stays in the foreground
//! until Ctrl-C, SIGTERM or SIGHUP (the terminal closed), then stops
//! everything it started. Data lives under `${BIDSFLUX_DEV_DIR:-./.bidsflux-dev}`
//! and survives restarts.
//!
//! The S3 port is kept in `<data dir>/s3-port` and reused on the next start:
//! every dataset's git-annex S3 remote names it, so a new port would leave the
//! earlier datasets pointing at a dead one. NATS takes any free port (clients
//! read it from `dev.env`).
//!
//! Everything else comes from the environment, as for the services: e.g.
//! `BIDSFLUX_COMPLETION_RULES=rules.toml` gives study-completion a rules file.
//! Its admin API listens on `127.0.0.1:50051` (where `bidsflux-ctl` looks by
//! default) and the metrics on `127.0.0.1:9464` (receiver), `:9465`
//! (study-completion) and `:9466` (uploader), unless their variables say otherwise. Tests running
//! the pipeline leave those unset and get free ports instead (see the library).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use bidsflux_config::Env;
use bidsflux_dev::{
    COMPLETION_GRPC_BIND_VAR, COMPLETION_HTTP_BIND_VAR, INDEXER_HTTP_BIND_VAR, RECEIVER_HTTP_BIND_VAR,
    UPLOADER_HTTP_BIND_VAR, client_url,
};
use bidsflux_testsupport::{NatsServer, S3Server, free_port};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    bidsflux_telemetry::service_main("bidsflux-dev", dev).await
}

/// S3 credentials of the embedded server, made once per data dir.
fn dev_credentials(dir: &Path) -> anyhow::Result<(String, String)> {
    let file = dir.join("s3-credentials");
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Some((id, secret)) = text.trim().split_once(':')
    {
        return Ok((id.to_owned(), secret.to_owned()));
    }
    let id = format!("bidsflux-dev-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let secret = uuid::Uuid::new_v4().simple().to_string();
    std::fs::write(&file, format!("{id}:{secret}\n")).context("write s3-credentials")?;
    Ok((id, secret))
}

/// Where the S3 port of the previous run is kept.
const S3_PORT_FILE: &str = "s3-port";

/// The S3 port of the previous run, if one was recorded.
fn saved_s3_port(dir: &Path) -> Option<u16> {
    std::fs::read_to_string(dir.join(S3_PORT_FILE)).ok()?.trim().parse().ok().filter(|p| *p != 0)
}

/// Starts the embedded S3 server on the port of the previous run, or on a new
/// free port (remembered for the next run) when there is none or it is taken.
async fn start_s3(dir: &Path, key: &str, secret: &str) -> anyhow::Result<S3Server> {
    let root = dir.join("s3");
    let saved = saved_s3_port(dir);
    let s3 = match saved {
        Some(port) => match S3Server::start_at(&root, &format!("127.0.0.1:{port}"), key, secret).await {
            Ok(s3) => s3,
            Err(e) => {
                let s3 = S3Server::start_at(&root, "127.0.0.1:0", key, secret).await.context("start the S3 server")?;
                tracing::warn!(
                    error = %format!("{e:#}"),
                    old_port = port,
                    new_port = s3.addr.port(),
                    "the S3 port of the previous run is taken, using a new one from now on: datasets indexed \
                     before keep their S3 remote at the old port, so `datalad get` fails in them"
                );
                s3
            }
        },
        None => S3Server::start_at(&root, "127.0.0.1:0", key, secret).await.context("start the S3 server")?,
    };
    if saved != Some(s3.addr.port()) {
        let file = dir.join(S3_PORT_FILE);
        std::fs::write(&file, format!("{}\n", s3.addr.port())).with_context(|| format!("write {}", file.display()))?;
    }
    Ok(s3)
}

/// Cancelled on Ctrl-C, SIGTERM or SIGHUP. SIGHUP comes when the terminal is
/// closed: without a handler the process would die on it and leave
/// nats-server (which takes SIGHUP as "reload") running.
fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    let stop = bidsflux_service::shutdown_on_signals();
    let mut hangup = signal(SignalKind::hangup()).context("listen for SIGHUP")?;
    let token = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = token.cancelled() => {}
            _ = hangup.recv() => {
                tracing::info!("hangup (terminal closed), shutting down");
                token.cancel();
            }
        }
    });
    Ok(stop)
}

async fn dev() -> anyhow::Result<()> {
    // First, so a signal during start-up stops cleanly instead of killing the
    // process and orphaning nats-server.
    let stop = stop_on_signals()?;
    let user = Env::from_process();
    let dir = user.path_or("BIDSFLUX_DEV_DIR", ".bidsflux-dev");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = std::fs::canonicalize(&dir)?;
    let sub = |name: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(p)
    };
    let dicom_port: u16 = user.parse_or("BIDSFLUX_DICOM_PORT", 11112)?;
    let dicom = TcpListener::bind(("127.0.0.1", dicom_port)).await.with_context(|| {
        format!("listen for DICOM on 127.0.0.1:{dicom_port} (in use? set BIDSFLUX_DICOM_PORT to another port)")
    })?;

    let nats = NatsServer::start_in(&sub("nats")?, free_port()?).await.context("start nats-server")?;
    let (key, secret) = dev_credentials(&dir)?;
    let s3 = start_s3(&dir, &key, &secret).await?;
    let s3_host = format!("127.0.0.1:{}", s3.addr.port());

    let mut env = user.clone();
    let defaults = [
        ("BIDSFLUX_AE_TITLE", "BIDSFLUX"),
        ("BIDSFLUX_QUIET_PERIOD", "60s"),
        ("GITLAB_INDEXER_GROUP_TEMPLATE", "{ReferringPhysicianName}/{StudyDescriptionPath[1]}"),
        // Fixed ports, on loopback like everything here; 50051 is bidsflux-ctl's default server.
        (RECEIVER_HTTP_BIND_VAR, "127.0.0.1:9464"),
        (COMPLETION_HTTP_BIND_VAR, "127.0.0.1:9465"),
        (COMPLETION_GRPC_BIND_VAR, "127.0.0.1:50051"),
        (UPLOADER_HTTP_BIND_VAR, "127.0.0.1:9466"),
        (INDEXER_HTTP_BIND_VAR, "127.0.0.1:9467"),
    ];
    for (k, v) in defaults {
        if user.get(k).is_none() {
            env.set(k, v);
        }
    }
    // The receiver denies unknown callers by default. Here it listens on
    // loopback only: accept any local sender unless the user gave a list.
    let access = ["BIDSFLUX_DICOM_ALLOWLIST", "BIDSFLUX_DICOM_ALLOWLIST_FILE", "BIDSFLUX_DICOM_ACCEPT_ANY"];
    if access.iter().all(|k| user.get(k).is_none()) {
        env.set("BIDSFLUX_DICOM_ACCEPT_ANY", "true");
    }
    let pattern = user.get("S3_URL_PATTERN").map(str::to_owned).unwrap_or_else(|| {
        format!("s3://{s3_host}/test.{{ReferringPhysicianName}}.{{StudyDescriptionPath[1]}}.dicoms")
    });
    let forge = sub("forge")?;
    let pairs = [
        ("NATS_URL", nats.url.clone()),
        ("BIDSFLUX_SPOOL_DIR", sub("spool")?.display().to_string()),
        ("BIDSFLUX_WORK_DIR", sub("work")?.display().to_string()),
        ("BIDSFLUX_FORGE", "local".to_owned()),
        ("BIDSFLUX_FORGE_DIR", forge.display().to_string()),
        ("S3_URL_PATTERN", pattern),
        ("AWS_ENDPOINT_URL", s3.endpoint.clone()),
        // Users reach the embedded server where the services do.
        ("BIDSFLUX_S3_PUBLIC_URL", s3.endpoint.clone()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", key.clone()),
        ("AWS_SECRET_ACCESS_KEY", secret.clone()),
    ];
    for (k, v) in pairs {
        env.set(k, v);
    }

    let dev_env = format!(
        "# Written by bidsflux-dev; source it with: set -a; . {path}; set +a\n\
         NATS_URL={nats}\nAWS_ENDPOINT_URL={s3}\nAWS_ACCESS_KEY_ID={key}\nAWS_SECRET_ACCESS_KEY={secret}\n\
         AWS_REGION=us-east-1\nBIDSFLUX_FORGE_DIR={forge}\nBIDSFLUX_DICOM_PORT={dicom_port}\n\
         GIT_CONFIG_COUNT=1\nGIT_CONFIG_KEY_0=annex.security.allowed-ip-addresses\nGIT_CONFIG_VALUE_0=127.0.0.1\n",
        path = dir.join("dev.env").display(),
        nats = nats.url,
        s3 = s3.endpoint,
        forge = forge.display(),
    );
    // DataLad (and its git-annex special remotes) from the repository's .venv,
    // when scripts/install-deps.sh had to make one (see the Makefile).
    let venv_bin = user.get("BIDSFLUX_VENV_BIN").map(PathBuf::from).filter(|p| p.is_dir());
    let dev_env = match venv_bin {
        Some(bin) => format!("{dev_env}PATH={}:$PATH\n", bin.display()),
        None => dev_env,
    };
    std::fs::write(dir.join("dev.env"), dev_env).context("write dev.env")?;

    let rules = match env.get(bidsflux_study_completion::RULES_VAR) {
        Some(path) => std::fs::canonicalize(path).map_or_else(|_| path.to_owned(), |p| p.display().to_string()),
        None => format!(
            "built in: every study indexed after {} without a new instance (BIDSFLUX_COMPLETION_RULES=FILE for yours)",
            env.get_or("BIDSFLUX_QUIET_PERIOD", "60s")
        ),
    };
    let receiver_http = env.get(RECEIVER_HTTP_BIND_VAR).and_then(|v| v.parse::<SocketAddr>().ok());
    let pipeline = tokio::select! {
        p = bidsflux_dev::Pipeline::start(env, dicom) => p.context("start the services")?,
        _ = stop.cancelled() => {
            tracing::info!("stopped during start-up");
            return Ok(());
        }
    };
    let admin = pipeline.admin_addr().map(client_url);
    if let Some(url) = &admin {
        // Sourcing dev.env points bidsflux-ctl at it.
        let file = dir.join("dev.env");
        let text = std::fs::read_to_string(&file).context("read dev.env")?;
        std::fs::write(&file, format!("{text}BIDSFLUX_CTL_SERVER={url}\n")).context("write dev.env")?;
    }
    println!(
        "{}",
        banner(&Banner {
            dicom_port,
            nats: &nats.url,
            s3: &s3.endpoint,
            forge: &forge,
            dev_env: &dir.join("dev.env"),
            rules: &rules,
            admin: admin.as_deref(),
            metrics: [("receiver", receiver_http), ("study-completion", pipeline.completion_http_addr())],
        })
    );
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = watch(&pipeline) => {}
    }
    pipeline.stop().await?;
    drop(s3);
    drop(nats);
    tracing::info!("everything stopped");
    Ok(())
}

/// What the start-up banner shows.
struct Banner<'a> {
    dicom_port: u16,
    nats: &'a str,
    s3: &'a str,
    forge: &'a Path,
    dev_env: &'a Path,
    rules: &'a str,
    /// URL of the admin API, `None` when it is off.
    admin: Option<&'a str>,
    metrics: [(&'static str, Option<SocketAddr>); 2],
}

/// The start-up banner: where everything is and what to type next.
fn banner(b: &Banner<'_>) -> String {
    let metrics: Vec<String> = b
        .metrics
        .iter()
        .map(|(name, addr)| {
            format!("{name} {}", addr.map_or_else(|| "off".to_owned(), |a| format!("{}/metrics", client_url(a))))
        })
        .collect();
    let (admin, ctl) = match b.admin {
        Some(url) => {
            // bidsflux-ctl looks at the service's default address unless told otherwise.
            let server = if url == client_url(bidsflux_study_completion::DEFAULT_GRPC_BIND) {
                String::new()
            } else {
                format!("--server {url} ")
            };
            (
                format!("{url} (gRPC, no authentication)"),
                format!(
                    "Where studies stand, and why one waits:\n  \
                     cargo run -q --bin bidsflux-ctl -- {server}studies   \
                     (also: study UID, hold|release|complete|discard|reindex UID, --help)\n"
                ),
            )
        }
        None => (format!("off ({COMPLETION_GRPC_BIND_VAR}=off): no bidsflux-ctl"), String::new()),
    };
    format!(
        "\nbidsflux is running (Ctrl-C to stop)\n  \
         DICOM      127.0.0.1:{port}  AE title BIDSFLUX\n  \
         NATS       {nats}\n  \
         S3         {s3}\n  \
         forge      {forge}\n  \
         settings   {env}\n  \
         rules      {rules}\n  \
         admin API  {admin}\n  \
         metrics    {metrics}\n\n\
         Send a study:   TCP_NODELAY=1 /usr/bin/storescu -aec BIDSFLUX 127.0.0.1 {port} +sd +r DIR\n\
         {ctl}\
         Then, after the quiet period:\n  \
         set -a; . {env}; set +a\n  \
         datalad clone {forge}/<group>/sourcedata/dicoms/<StudyInstanceUID>.git x && cd x && datalad get .\n",
        port = b.dicom_port,
        nats = b.nats,
        s3 = b.s3,
        forge = b.forge.display(),
        env = b.dev_env.display(),
        rules = b.rules,
        metrics = metrics.join(", "),
    )
}

/// Returns when a service ends on its own (it should not).
async fn watch(p: &bidsflux_dev::Pipeline) {
    loop {
        let done = p.finished();
        if !done.is_empty() {
            tracing::error!(services = ?done, "a service stopped unexpectedly; shutting down");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
