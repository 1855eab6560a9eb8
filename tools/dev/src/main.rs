//! `bidsflux-dev` (`make dev`): runs the whole pipeline locally on embedded defaults.
//!
//! Starts Debian's `nats-server` and an embedded S3 server on free loopback
//! ports, provisions the bus, runs the five services with the local forge,
//! listens for DICOM on `127.0.0.1:${BIDSFLUX_DICOM_PORT:-11112}` (AE title
//! `BIDSFLUX`), writes `<data dir>/dev.env`, and stays in the foreground
//! until Ctrl-C or SIGTERM, then stops everything it started. Data lives under
//! `${BIDSFLUX_DEV_DIR:-./.bidsflux-dev}` and survives restarts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use bidsflux_config::Env;
use bidsflux_testsupport::{NatsServer, S3Server, free_port};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = match bidsflux_telemetry::init_telemetry("bidsflux-dev") {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cannot initialise telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match dev().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "bidsflux-dev failed");
            ExitCode::FAILURE
        }
    }
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

async fn dev() -> anyhow::Result<()> {
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
    let s3 = S3Server::start_at(&sub("s3")?, "127.0.0.1:0", &key, &secret).await.context("start the S3 server")?;
    let s3_host = format!("127.0.0.1:{}", s3.addr.port());

    let mut env = user.clone();
    let defaults = [
        ("BIDSFLUX_AE_TITLE", "BIDSFLUX"),
        ("BIDSFLUX_QUIET_PERIOD", "60s"),
        ("GITLAB_INDEXER_GROUP_TEMPLATE", "{ReferringPhysicianName}/{StudyDescriptionPath[1]}"),
    ];
    for (k, v) in defaults {
        if user.get(k).is_none() {
            env.set(k, v);
        }
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
    std::fs::write(dir.join("dev.env"), dev_env).context("write dev.env")?;

    let pipeline = bidsflux_dev::Pipeline::start(env, dicom).await?;
    println!(
        "\nbidsflux is running (Ctrl-C to stop)\n  DICOM      127.0.0.1:{dicom_port}  AE title BIDSFLUX\n  NATS       {}\n  S3         {}\n  forge      {}\n  settings   {}\n\n\
         Send a study:   TCP_NODELAY=1 /usr/bin/storescu -aec BIDSFLUX 127.0.0.1 {dicom_port} +sd +r DIR\n\
         Then, after the quiet period:\n  set -a; . {}; set +a\n  datalad clone {}/<group>/sourcedata/dicoms/<StudyInstanceUID>.git x && cd x && datalad get .\n",
        nats.url,
        s3.endpoint,
        forge.display(),
        dir.join("dev.env").display(),
        dir.join("dev.env").display(),
        forge.display(),
    );
    let stop = bidsflux_messaging::shutdown_on_signals();
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
