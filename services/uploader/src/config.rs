//! Configuration of the uploader, from environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bidsflux_config::{ConfigError, Env, Secret, secrets};
use bidsflux_session::s3::S3UrlPattern;

/// Everything the uploader needs to know at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// `NATS_URL`: where the bus is (comma-separated list for a cluster).
    pub nats_url: String,
    /// `BIDSFLUX_SPOOL_DIR`: the receiver's spool. Archiving only reads it; the
    /// spool [`lifecycle`](crate::lifecycle) deletes a study's files once it is
    /// indexed or discarded (never with `BIDSFLUX_SPOOL_KEEP`).
    pub spool_dir: PathBuf,
    /// `BIDSFLUX_WORK_DIR`: where archives are built, one fresh temp directory
    /// per study. Kept apart from the spool so the receiver never sees them and
    /// so it can live on a disk with room for the largest archive.
    pub work_dir: PathBuf,
    /// `S3_URL_PATTERN`: bucket and key prefix of each study, rendered from its
    /// session metas (the original BIDS-flux form, kept for compatibility).
    pub s3_url_pattern: S3UrlPattern,
    /// `AWS_ENDPOINT_URL`: the S3 API endpoint. Defaults to `https://<host of
    /// the pattern>` as the original did; set it for plain-http MinIO or tests.
    pub endpoint_url: String,
    /// `BIDSFLUX_S3_PUBLIC_URL`: `scheme://host[:port]` where users and
    /// git-annex reach the same S3 server, recorded in `ArchiveStored` for the
    /// datasets' S3 special remote. Differs from `AWS_ENDPOINT_URL` when the
    /// uploader talks to an internal name (`http://minio:9000` in the swarm)
    /// that does not resolve outside. Defaults to `https://<host of the
    /// pattern>`, what the original BIDS-flux gave git-annex.
    pub public_url: String,
    /// `AWS_REGION`: signing region (MinIO accepts any; AWS needs the bucket's).
    pub region: String,
    /// `AWS_ACCESS_KEY_ID` (or `/run/secrets/s3_id`): S3 credentials.
    pub access_key_id: Secret,
    /// `AWS_SECRET_ACCESS_KEY` (or `/run/secrets/s3_secret`): S3 credentials.
    pub secret_access_key: Secret,
    /// `BIDSFLUX_S3_CA_BUNDLE` (or the SDKs' `AWS_CA_BUNDLE`): a PEM file of CA
    /// certificates trusted for the S3 endpoint's TLS certificate besides the
    /// system roots — sites run MinIO with their own CA or a self-signed
    /// certificate. Read and checked at start.
    pub ca_bundle: Option<CaBundle>,
    /// `BIDSFLUX_S3_PATH_STYLE`: `http://host/bucket/key` requests. MinIO and
    /// git-annex's `requeststyle=path` need it, and bucket names with dots
    /// break virtual-host TLS certificates.
    pub path_style: bool,
    /// `BIDSFLUX_S3_CREATE_BUCKET`: create a study's bucket when it does not
    /// exist (one bucket per PI/study is the original's layout). Turn it off
    /// where buckets are provisioned by hand and a missing one is a mistake.
    pub create_bucket: bool,
    /// `BIDSFLUX_S3_MAX_ATTEMPTS`: attempts per S3 request inside the SDK's
    /// standard retry strategy, before the message itself is retried later.
    pub s3_max_attempts: u32,
    /// `BIDSFLUX_S3_PART_SIZE`: archives larger than this are uploaded in
    /// parts of this size (multipart upload), smaller ones with one
    /// PutObject. S3 wants parts of at least 5 MiB and at most 10 000 of
    /// them: the part size grows for archives larger than 10 000 parts.
    pub part_size: u64,
    /// `BIDSFLUX_S3_UPLOAD_CONCURRENCY`: parts of one archive uploaded at once.
    /// Each holds one part in memory, so an upload buffers at most
    /// concurrency × part size.
    pub upload_concurrency: usize,
    /// `BIDSFLUX_S3_PART_ATTEMPTS`: attempts per part (and per
    /// CompleteMultipartUpload), each with the SDK's own retries, with
    /// exponential backoff in between (1 s, 2 s, 4 s … at most 16 s), so an
    /// S3 outage of a few seconds costs a retry of the parts in flight, not
    /// of the whole archive.
    pub part_attempts: u32,
    /// `BIDSFLUX_7Z_LEVEL`: compression level 0..9 as 7-Zip's `-mx` (0 stores,
    /// 1..9 are LZMA2 at that xz preset); 5 is what the original used. DICOM
    /// pixel data compresses little, so higher levels mostly cost CPU.
    pub sevenzip_level: u8,
    /// `BIDSFLUX_7Z_THREADS`: files compressed at once (every file is its own
    /// block); 0, the default, means one per CPU.
    pub sevenzip_threads: usize,
    /// `BIDSFLUX_UPLOADER_CONCURRENCY`: studies handled at once. Each needs an
    /// archive's worth of work-dir space and one upload's bandwidth.
    pub concurrency: usize,
    /// `BIDSFLUX_MANIFEST_INLINE_MAX`: largest encoded `ArchiveStored` (bytes)
    /// that carries its manifest inline; larger manifests go to the JetStream
    /// object store `bidsflux_v1_manifests`. Unset: three quarters of the NATS
    /// server's `max_payload`. Tests set it low to exercise the object store.
    pub manifest_inline_max: Option<usize>,
    /// `BIDSFLUX_SPOOL_KEEP`: never delete spool files (what would have been
    /// deleted is logged at debug level). Default false: a study's files are
    /// deleted once it is indexed (or discarded).
    pub spool_keep: bool,
    /// `BIDSFLUX_SPOOL_DELETE_DISCARDED`: on *study discarded*, delete the study's files written
    /// before the discard (default false: they stay, and the janitor reports them). Off by
    /// default because *study discarded* does not list its instances: a file written before the
    /// discard may belong to a later generation still being decided, or to an earlier one not
    /// yet archived, and deleting it would lose data no archive holds.
    pub spool_delete_discarded: bool,
    /// `BIDSFLUX_SPOOL_JANITOR_INTERVAL`: how often the janitor walks the spool
    /// (default 10m).
    pub janitor_interval: Duration,
    /// `BIDSFLUX_SPOOL_STALE_AFTER`: a study whose newest spool file is older
    /// than this and still there is reported as stale (default 24h).
    pub stale_after: Duration,
    /// `BIDSFLUX_SPOOL_EMPTY_DIR_AGE`: an empty series or study directory is
    /// removed only when it has not changed for this long (default 10m), so
    /// the receiver, which creates a directory just before linking a file into
    /// it, never loses the race.
    pub empty_dir_age: Duration,
    /// `BIDSFLUX_UPLOADER_HTTP_BIND`: `GET /metrics` and `GET /healthz`
    /// (default `0.0.0.0:9466`, `off` disables).
    pub http_bind: Option<SocketAddr>,
}

/// Variable of [`Config::http_bind`].
pub const HTTP_BIND_VAR: &str = "BIDSFLUX_UPLOADER_HTTP_BIND";
/// Default of [`HTTP_BIND_VAR`] (the receiver's is 9464, study-completion's 9465).
pub const DEFAULT_HTTP_BIND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9466);

/// Default spool directory (shared with the receiver).
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/bidsflux/spool";
/// Default work directory.
pub const DEFAULT_WORK_DIR: &str = "/var/lib/bidsflux/work";

impl Config {
    /// Reads the configuration; errors name the variable at fault.
    pub fn from_env(env: &Env) -> Result<Config, ConfigError> {
        let nats_url = env.get_or("NATS_URL", "nats://127.0.0.1:4222").to_owned();
        let pattern_text = env.required("S3_URL_PATTERN")?;
        let s3_url_pattern =
            S3UrlPattern::parse(pattern_text).map_err(|e| ConfigError::invalid("S3_URL_PATTERN", e.to_string()))?;
        let endpoint_url = match env.get("AWS_ENDPOINT_URL") {
            Some(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(ConfigError::invalid("AWS_ENDPOINT_URL", format!("{url:?} is not an http(s) URL")));
                }
                url.trim_end_matches('/').to_owned()
            }
            None => format!("https://{}", s3_url_pattern.host),
        };
        let public_url = match env.get("BIDSFLUX_S3_PUBLIC_URL") {
            Some(url) => public_url(url).map_err(|why| ConfigError::invalid("BIDSFLUX_S3_PUBLIC_URL", why))?,
            None => public_url(&format!("https://{}", s3_url_pattern.host))
                .map_err(|why| ConfigError::invalid("S3_URL_PATTERN", format!("its host as a public URL: {why}")))?,
        };
        let access_key_id = env
            .secret("AWS_ACCESS_KEY_ID", Some(&secrets::path(secrets::S3_ID)))?
            .ok_or_else(|| ConfigError::Missing { var: "AWS_ACCESS_KEY_ID (or /run/secrets/s3_id)".to_owned() })?;
        let secret_access_key =
            env.secret("AWS_SECRET_ACCESS_KEY", Some(&secrets::path(secrets::S3_SECRET)))?.ok_or_else(|| {
                ConfigError::Missing { var: "AWS_SECRET_ACCESS_KEY (or /run/secrets/s3_secret)".to_owned() }
            })?;
        let sevenzip_level: u8 = env.parse_or("BIDSFLUX_7Z_LEVEL", 5)?;
        if sevenzip_level > 9 {
            return Err(ConfigError::invalid("BIDSFLUX_7Z_LEVEL", format!("{sevenzip_level} is not in 0..=9")));
        }
        let s3_max_attempts: u32 = env.parse_or("BIDSFLUX_S3_MAX_ATTEMPTS", 5)?;
        if s3_max_attempts == 0 {
            return Err(ConfigError::invalid("BIDSFLUX_S3_MAX_ATTEMPTS", "must be at least 1"));
        }
        let part_size = match env.get("BIDSFLUX_S3_PART_SIZE") {
            Some(text) => parse_size(text).map_err(|why| ConfigError::invalid("BIDSFLUX_S3_PART_SIZE", why))?,
            None => DEFAULT_PART_SIZE,
        };
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
            return Err(ConfigError::invalid(
                "BIDSFLUX_S3_PART_SIZE",
                format!("{part_size} bytes is not between 5 MiB and 5 GiB (S3's limits for a part)"),
            ));
        }
        let upload_concurrency: usize = env.parse_or("BIDSFLUX_S3_UPLOAD_CONCURRENCY", 4)?;
        if upload_concurrency == 0 {
            return Err(ConfigError::invalid("BIDSFLUX_S3_UPLOAD_CONCURRENCY", "must be at least 1"));
        }
        let part_attempts: u32 = env.parse_or("BIDSFLUX_S3_PART_ATTEMPTS", 6)?;
        if part_attempts == 0 {
            return Err(ConfigError::invalid("BIDSFLUX_S3_PART_ATTEMPTS", "must be at least 1"));
        }
        let concurrency: usize = env.parse_or("BIDSFLUX_UPLOADER_CONCURRENCY", 1)?;
        if concurrency == 0 {
            return Err(ConfigError::invalid("BIDSFLUX_UPLOADER_CONCURRENCY", "must be at least 1"));
        }
        let janitor_interval = env.duration_or("BIDSFLUX_SPOOL_JANITOR_INTERVAL", Duration::from_secs(600))?;
        if janitor_interval.is_zero() {
            return Err(ConfigError::invalid("BIDSFLUX_SPOOL_JANITOR_INTERVAL", "must be more than zero"));
        }
        let http_bind = env.listen_addr_or(HTTP_BIND_VAR, DEFAULT_HTTP_BIND)?;
        Ok(Config {
            spool_keep: env.bool_or("BIDSFLUX_SPOOL_KEEP", false)?,
            spool_delete_discarded: env.bool_or("BIDSFLUX_SPOOL_DELETE_DISCARDED", false)?,
            janitor_interval,
            stale_after: env.duration_or("BIDSFLUX_SPOOL_STALE_AFTER", Duration::from_secs(24 * 3600))?,
            empty_dir_age: env.duration_or("BIDSFLUX_SPOOL_EMPTY_DIR_AGE", Duration::from_secs(600))?,
            http_bind,
            nats_url,
            spool_dir: env.path_or("BIDSFLUX_SPOOL_DIR", DEFAULT_SPOOL_DIR),
            work_dir: env.path_or("BIDSFLUX_WORK_DIR", DEFAULT_WORK_DIR),
            s3_url_pattern,
            endpoint_url,
            public_url,
            region: env.get_or("AWS_REGION", "us-east-1").to_owned(),
            access_key_id,
            secret_access_key,
            ca_bundle: ca_bundle(env)?,
            path_style: env.bool_or("BIDSFLUX_S3_PATH_STYLE", true)?,
            create_bucket: env.bool_or("BIDSFLUX_S3_CREATE_BUCKET", true)?,
            s3_max_attempts,
            part_size,
            upload_concurrency,
            part_attempts,
            sevenzip_level,
            sevenzip_threads: match env.parse_or::<usize>("BIDSFLUX_7Z_THREADS", 0)? {
                0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
                n => n,
            },
            concurrency,
            manifest_inline_max: env
                .parse_or::<usize>("BIDSFLUX_MANIFEST_INLINE_MAX", 0)
                .map(|n| (n > 0).then_some(n))?,
        })
    }
}

/// Default `BIDSFLUX_S3_PART_SIZE`: 64 MiB.
pub const DEFAULT_PART_SIZE: u64 = 64 * 1024 * 1024;
/// Smallest part S3 accepts (but for the last one).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Largest part S3 accepts.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// A size in bytes: a number with an optional `KiB`, `MiB` or `GiB` suffix.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, ""),
    };
    let unit: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("{text:?} is not a size (bytes, or a number with KiB, MiB or GiB)")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{text:?} is not a size (bytes, or a number with KiB, MiB or GiB)"))
}

/// Checks a public S3 URL: `http(s)://host[:port]`, no path, query or
/// credentials (git-annex's S3 remote knows only host, port and protocol).
/// Returns it without a trailing `/`.
fn public_url(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let authority = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http(s) URL"))?;
    let bad = || format!("{url:?} must be http(s)://HOST[:PORT] without a path");
    if authority.contains(['/', '?', '#', '@']) || authority.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
            }
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if host.is_empty() || !port_ok {
        return Err(bad());
    }
    Ok(url.to_owned())
}

/// Extra CA certificates for the S3 endpoint, from a PEM file.
#[derive(Debug, Clone)]
pub struct CaBundle {
    /// Where they were read from (for messages).
    pub path: PathBuf,
    /// The TLS settings trusting them and the system roots.
    pub tls: aws_smithy_http_client::tls::TlsContext,
}

fn ca_bundle(env: &Env) -> Result<Option<CaBundle>, ConfigError> {
    let Some((var, path)) = ["BIDSFLUX_S3_CA_BUNDLE", "AWS_CA_BUNDLE"]
        .into_iter()
        .find_map(|var| env.get(var).filter(|v| !v.is_empty()).map(|v| (var, PathBuf::from(v))))
    else {
        return Ok(None);
    };
    let pem =
        std::fs::read(&path).map_err(|e| ConfigError::invalid(var, format!("cannot read {}: {e}", path.display())))?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(ConfigError::invalid(var, format!("{} holds no PEM certificate", path.display())));
    }
    use aws_smithy_http_client::tls::{TlsContext, TrustStore};
    let tls = TlsContext::builder()
        .with_trust_store(TrustStore::empty().with_native_roots(true).with_pem_certificate(pem))
        .build()
        .map_err(|e| ConfigError::invalid(var, format!("{}: {e}", path.display())))?;
    Ok(Some(CaBundle { path, tls }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Env {
        Env::from_pairs([
            ("S3_URL_PATTERN", "s3://s3.example.org/test.{ReferringPhysicianName}.dicoms"),
            ("AWS_ACCESS_KEY_ID", "id"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ])
    }

    #[test]
    fn defaults() {
        let c = Config::from_env(&base()).unwrap();
        assert_eq!(c.endpoint_url, "https://s3.example.org");
        assert_eq!(c.public_url, "https://s3.example.org");
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.spool_dir, PathBuf::from(DEFAULT_SPOOL_DIR));
        assert_eq!(c.work_dir, PathBuf::from(DEFAULT_WORK_DIR));
        assert!(c.path_style && c.create_bucket);
        assert_eq!((c.sevenzip_level, c.s3_max_attempts, c.concurrency), (5, 5, 1));
        assert!(c.sevenzip_threads >= 1);
        assert_eq!((c.part_size, c.upload_concurrency, c.part_attempts), (64 << 20, 4, 6));
        assert!(!c.spool_keep);
        assert_eq!((c.janitor_interval, c.stale_after), (Duration::from_secs(600), Duration::from_secs(86400)));
        assert_eq!((c.empty_dir_age, c.http_bind), (Duration::from_secs(600), Some(DEFAULT_HTTP_BIND)));
        let c = Config::from_env(&base().with("BIDSFLUX_SPOOL_KEEP", "true").with(HTTP_BIND_VAR, "off")).unwrap();
        assert!(c.spool_keep && c.http_bind.is_none());
        let debug = format!("{c:?}");
        assert!(!debug.contains("secret\""), "{debug}");
    }

    #[test]
    fn part_sizes() {
        assert_eq!(parse_size("5242880").unwrap(), 5 << 20);
        assert_eq!(parse_size("8 MiB").unwrap(), 8 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("16KiB").unwrap(), 16 << 10);
        for bad in ["", "MiB", "1.5MiB", "-1", "8mb", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
        let c = Config::from_env(&base().with("BIDSFLUX_S3_PART_SIZE", "5MiB")).unwrap();
        assert_eq!(c.part_size, MIN_PART_SIZE);
    }

    #[test]
    fn public_url_is_separate_from_the_endpoint() {
        let env = base()
            .with("S3_URL_PATTERN", "s3://minio:9000/dicoms")
            .with("AWS_ENDPOINT_URL", "http://minio:9000")
            .with("BIDSFLUX_S3_PUBLIC_URL", "https://s3.example.org/");
        let c = Config::from_env(&env).unwrap();
        assert_eq!((c.endpoint_url.as_str(), c.public_url.as_str()), ("http://minio:9000", "https://s3.example.org"));
        let c = Config::from_env(&base().with("S3_URL_PATTERN", "s3://minio:9000/dicoms")).unwrap();
        assert_eq!(c.public_url, "https://minio:9000", "default: https://<host of the pattern>");
        for ok in ["http://127.0.0.1:9000", "https://[::1]:9000", "https://s3.example.org"] {
            assert_eq!(public_url(ok).unwrap(), ok);
        }
        for bad in [
            "s3.example.org",
            "ftp://x",
            "https://",
            "https://x/path",
            "https://u:p@x",
            "https://x:0",
            "https://x:y",
            "https://[::1]x",
        ] {
            assert!(public_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn errors_name_the_variable() {
        for (var, value) in [
            ("S3_URL_PATTERN", "http://nope"),
            ("AWS_ENDPOINT_URL", "s3.example.org"),
            ("BIDSFLUX_S3_PUBLIC_URL", "s3.example.org"),
            ("BIDSFLUX_S3_PUBLIC_URL", "https://s3.example.org/bucket"),
            ("BIDSFLUX_7Z_LEVEL", "12"),
            ("BIDSFLUX_S3_PATH_STYLE", "sometimes"),
            ("BIDSFLUX_S3_MAX_ATTEMPTS", "0"),
            ("BIDSFLUX_UPLOADER_CONCURRENCY", "x"),
            ("BIDSFLUX_S3_PART_SIZE", "4MiB"),
            ("BIDSFLUX_S3_PART_SIZE", "6GiB"),
            ("BIDSFLUX_S3_PART_SIZE", "64MB"),
            ("BIDSFLUX_S3_UPLOAD_CONCURRENCY", "0"),
            ("BIDSFLUX_S3_PART_ATTEMPTS", "0"),
        ] {
            let e = Config::from_env(&base().with(var, value)).unwrap_err().to_string();
            assert!(e.contains(var), "{var}: {e}");
        }
        let env = Env::from_pairs([("S3_URL_PATTERN", "s3://h/b"), ("AWS_ACCESS_KEY_ID", "id")]);
        let e = Config::from_env(&env).unwrap_err().to_string();
        assert!(e.contains("AWS_SECRET_ACCESS_KEY"), "{e}");
        let e = Config::from_env(&Env::default()).unwrap_err().to_string();
        assert!(e.contains("S3_URL_PATTERN"), "{e}");
    }
}
