//! `bidsflux-s3-dev`: the embedded S3 server of `make dev` ([`S3Server`], s3s-fs: objects are
//! files under `--root`) as a program of its own, for the swarm stack's deploy test where MinIO's
//! image cannot be pulled (`stack/Dockerfile`, stage `s3-dev`). A stand-in, not for a site.
//!
//! ```text
//! bidsflux-s3-dev [--root DIR] [--listen ADDR] [--access-key-file F] [--secret-key-file F]
//! bidsflux-s3-dev health [--listen ADDR]
//! mc ready local            (the same probe, called as MinIO's healthcheck calls it)
//! ```
//!
//! The credentials are read from files, the swarm secrets MinIO reads (`/run/secrets/s3_id`,
//! `/run/secrets/s3_secret` by default). `health` exits 0 when the server answers HTTP on its
//! port (an unsigned request gets S3's `AccessDenied`, which is an answer).

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bidsflux_testsupport::S3Server;

#[derive(Debug)]
struct Args {
    health: bool,
    root: PathBuf,
    listen: String,
    key_file: PathBuf,
    secret_file: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        health: false,
        root: "/data".into(),
        listen: "0.0.0.0:9000".into(),
        key_file: "/run/secrets/s3_id".into(),
        secret_file: "/run/secrets/s3_secret".into(),
    };
    // Installed as `mc` too (stack/Dockerfile): the stack's MinIO healthcheck, `mc ready local`,
    // then probes this server, so the stand-in needs no healthcheck of its own.
    let argv0 = std::env::args().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name().is_some_and(|n| n == "mc") {
        let rest: Vec<String> = std::env::args().skip(1).collect();
        anyhow::ensure!(rest == ["ready", "local"], "as `mc`, only `mc ready local` is understood");
        a.health = true;
        return Ok(a);
    }
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "health" => a.health = true,
            "--root" => a.root = value()?.into(),
            "--listen" => a.listen = value()?,
            "--access-key-file" => a.key_file = value()?.into(),
            "--secret-key-file" => a.secret_file = value()?.into(),
            _ => anyhow::bail!("unknown argument {arg:?} (see the module docs)"),
        }
    }
    Ok(a)
}

fn secret(path: &PathBuf) -> anyhow::Result<String> {
    let value = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let value = value.trim_end_matches(['\r', '\n']).to_owned();
    anyhow::ensure!(!value.is_empty(), "{} is empty", path.display());
    Ok(value)
}

fn health(listen: &str) -> anyhow::Result<()> {
    let port = listen.rsplit(':').next().unwrap_or_default();
    let addr = format!("127.0.0.1:{port}");
    let to = Duration::from_secs(3);
    let sock = addr.parse().with_context(|| format!("bad --listen {listen:?}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, to).with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(to))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0_u8; 12];
    s.read_exact(&mut head).with_context(|| format!("no HTTP answer from {addr}"))?;
    anyhow::ensure!(head.starts_with(b"HTTP/1."), "{addr} did not answer HTTP");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let run = async {
        let a = args()?;
        if a.health {
            return health(&a.listen);
        }
        let (key, secret) = (secret(&a.key_file)?, secret(&a.secret_file)?);
        let server = S3Server::start_at(&a.root, &a.listen, &key, &secret).await?;
        println!(
            "bidsflux-s3-dev: serving {} on {} (a stand-in for MinIO, not for a site)",
            a.root.display(),
            server.addr
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        drop(server);
        anyhow::Ok(())
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bidsflux-s3-dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}
