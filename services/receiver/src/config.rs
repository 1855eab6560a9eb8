//! Configuration of the receiver.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bidsflux_config::{ConfigError, Env};

use crate::access::{self, Policy};
use crate::rule_attributes::{self, RuleAttributes};
use crate::tls::TlsSettings;

/// Smallest maximum PDU length we advertise (dicom-ul refuses less than 1 KiB; 4 KiB keeps the
/// per-PDU overhead reasonable).
const MIN_PDU: u32 = 4096;
/// Largest maximum PDU length we advertise: every association holds up to one PDU in memory.
const MAX_PDU: u32 = 4 * 1024 * 1024;

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS server(s) (`NATS_URL`, default `nats://127.0.0.1:4222`): where `InstanceStored` goes.
    pub nats_url: String,
    /// Spool root (`BIDSFLUX_SPOOL_DIR`, default `/var/lib/bidsflux/spool`). Instances land in
    /// `<spool>/<study>/<series>/<sop>.dcm`, which the uploader reads; temp files live in
    /// `<spool>/.tmp` so that the final rename stays on one file system and is atomic.
    pub spool_dir: PathBuf,
    /// Address the DICOM listener binds (`BIDSFLUX_DICOM_BIND`, default `0.0.0.0:11112`); sites used
    /// port 2100 with storescp.
    pub dicom_bind: SocketAddr,
    /// Our AE title (`BIDSFLUX_AE_TITLE`, default `BIDSFLUX`, 1–16 characters): the called AE title
    /// allow-list entries may use when they name none (and the only one with accept-any);
    /// associations calling another are rejected, so a scanner misconfigured for another node
    /// fails loudly instead of sending data to the wrong place.
    pub ae_title: String,
    /// Maximum PDU length we accept (`BIDSFLUX_MAX_PDU`, default 65536 bytes, 4096..=4194304). Bigger
    /// PDUs mean fewer reads per instance; each open association holds about one PDU in memory, so
    /// this bounds memory per association (DCMTK's storescp uses 16384, its maximum is 131072).
    pub max_pdu: u32,
    /// How long a peer may stay silent, during negotiation or between PDUs, before its association
    /// is aborted (`BIDSFLUX_DICOM_TIMEOUT`, default 120 s): frees what vanished peers hold.
    pub dicom_timeout: Duration,
    /// Most associations served at once (`BIDSFLUX_MAX_ASSOCIATIONS`, default 64); further ones
    /// are rejected at once with A-ASSOCIATE-RJ (rejected-transient, local-limit-exceeded) so the
    /// sender retries later instead of hanging in the listen backlog. Bounds open files and memory.
    pub max_associations: usize,
    /// On shutdown, how long open associations may go on before they are aborted
    /// (`BIDSFLUX_SHUTDOWN_GRACE`, default 10 s). Stores being acknowledged still finish.
    pub shutdown_grace: Duration,
    /// Who may associate ([`crate::access`]), deny by default: the allow-list of
    /// `BIDSFLUX_DICOM_ALLOWLIST` (entries separated by `;`) and `BIDSFLUX_DICOM_ALLOWLIST_FILE` (one
    /// a line), or any caller with `BIDSFLUX_DICOM_ACCEPT_ANY=true` (development only). With
    /// neither, the receiver refuses to start: a scanner network is no place for an open door.
    pub access: Policy,
    /// DICOM TLS (`BIDSFLUX_DICOM_TLS_CERT_FILE` + `BIDSFLUX_DICOM_TLS_KEY_FILE`, optionally
    /// `BIDSFLUX_DICOM_TLS_CLIENT_CA_FILE` for mutual TLS); `None`: plain TCP.
    pub tls: Option<TlsSettings>,
    /// Free space the spool's file system must keep (`BIDSFLUX_SPOOL_MIN_FREE`, default 2 GiB;
    /// bytes, or with a `KiB`/`MiB`/`GiB`/`TiB` suffix). Below it, stores are refused with 0xA700
    /// (out of resources) before the disk is exhausted, so that the spool, the journal of the file
    /// system and the services sharing the disk keep room.
    pub spool_min_free: u64,
    /// Address of the HTTP listener for `/healthz` and `/metrics` (`BIDSFLUX_RECEIVER_HTTP_BIND`,
    /// default `0.0.0.0:9464`; `off` disables it).
    pub http_bind: Option<SocketAddr>,
    /// Data set attributes copied into `InstanceStored.attributes` for the completion rules
    /// (`BIDSFLUX_RULE_ATTRIBUTES`, comma-separated keywords, default
    /// [`crate::rule_attributes::DEFAULT`] when unset or empty; `none`: none). Patient attributes only with
    /// `BIDSFLUX_RULE_ATTRIBUTES_ALLOW_PATIENT=true`.
    pub rule_attributes: RuleAttributes,
}

/// Variable of the spool free-space threshold.
pub const SPOOL_MIN_FREE_VAR: &str = "BIDSFLUX_SPOOL_MIN_FREE";
/// Variable of the HTTP (health, metrics) listener address.
pub const HTTP_BIND_VAR: &str = "BIDSFLUX_RECEIVER_HTTP_BIND";
/// Default of [`HTTP_BIND_VAR`].
pub const DEFAULT_HTTP_BIND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9464);
/// The variable of [`Config::dicom_bind`].
pub const DICOM_BIND_VAR: &str = "BIDSFLUX_DICOM_BIND";

/// Parses a size: bytes, optionally followed by `B`, `KiB`, `MiB`, `GiB` or `TiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size (e.g. 2GiB, 500MiB, 1048576)"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => return Err(format!("unknown unit {other:?} (use B, KiB, MiB, GiB or TiB)")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("{text:?} is too large"))
}

/// Variable of the inline allow-list.
pub const ALLOWLIST_VAR: &str = "BIDSFLUX_DICOM_ALLOWLIST";
/// Variable naming the allow-list file.
pub const ALLOWLIST_FILE_VAR: &str = "BIDSFLUX_DICOM_ALLOWLIST_FILE";
/// Variable of the development switch that lets any caller in.
pub const ACCEPT_ANY_VAR: &str = "BIDSFLUX_DICOM_ACCEPT_ANY";

/// Reads the access policy; errors name the variable and the entry.
fn access_policy(env: &Env, our_ae: &str) -> Result<Policy, ConfigError> {
    let accept_any = env.bool_or(ACCEPT_ANY_VAR, false)?;
    let mut entries = Vec::new();
    if let Some(inline) = env.get(ALLOWLIST_VAR) {
        entries.extend(access::parse_list(inline, ';', our_ae).map_err(|e| ConfigError::invalid(ALLOWLIST_VAR, e))?);
    }
    if let Some(path) = env.get(ALLOWLIST_FILE_VAR) {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::invalid(ALLOWLIST_FILE_VAR, format!("cannot read {path}: {e}")))?;
        entries.extend(
            access::parse_list(&text, '\n', our_ae)
                .map_err(|e| ConfigError::invalid(ALLOWLIST_FILE_VAR, format!("{path}: {e}")))?,
        );
    }
    match (accept_any, entries.is_empty()) {
        (true, true) => Ok(Policy::AcceptAny { our_ae: our_ae.to_owned() }),
        (true, false) => Err(ConfigError::invalid(
            ACCEPT_ANY_VAR,
            format!("cannot be combined with an allow-list ({ALLOWLIST_VAR}, {ALLOWLIST_FILE_VAR}): choose one"),
        )),
        (false, false) => Ok(Policy::AllowList(entries)),
        (false, true) => Err(ConfigError::invalid(
            ALLOWLIST_VAR,
            format!(
                "no scanner may send: set {ALLOWLIST_VAR} (e.g. SCANNER1@10.0.0.0/24=BIDSFLUX;MRI2) or \
                 {ALLOWLIST_FILE_VAR} (the receiver denies by default), or {ACCEPT_ANY_VAR}=true for development"
            ),
        )),
    }
}

impl Config {
    /// Reads the configuration; errors name the variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let dicom_bind = env.parse_or(DICOM_BIND_VAR, SocketAddr::from(([0, 0, 0, 0], 11112)))?;
        let ae_title = env.get_or("BIDSFLUX_AE_TITLE", "BIDSFLUX").to_owned();
        if ae_title.len() > 16 || !ae_title.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\') {
            return Err(ConfigError::invalid(
                "BIDSFLUX_AE_TITLE",
                "must be 1 to 16 printable ASCII characters without backslash",
            ));
        }
        let max_pdu = env.parse_or("BIDSFLUX_MAX_PDU", 65536_u32)?;
        if !(MIN_PDU..=MAX_PDU).contains(&max_pdu) {
            return Err(ConfigError::invalid("BIDSFLUX_MAX_PDU", format!("{max_pdu} is not in {MIN_PDU}..={MAX_PDU}")));
        }
        let dicom_timeout = env.duration_or("BIDSFLUX_DICOM_TIMEOUT", Duration::from_secs(120))?;
        if dicom_timeout.is_zero() {
            return Err(ConfigError::invalid("BIDSFLUX_DICOM_TIMEOUT", "must be greater than zero"));
        }
        let max_associations = env.parse_or("BIDSFLUX_MAX_ASSOCIATIONS", 64_usize)?;
        if max_associations == 0 {
            return Err(ConfigError::invalid("BIDSFLUX_MAX_ASSOCIATIONS", "must be at least 1"));
        }
        let access = access_policy(env, &ae_title)?;
        let tls = TlsSettings::from_env(env)?;
        let spool_min_free = match env.get(SPOOL_MIN_FREE_VAR) {
            Some(text) => parse_size(text).map_err(|e| ConfigError::invalid(SPOOL_MIN_FREE_VAR, e))?,
            None => 2 << 30,
        };
        let http_bind = env.listen_addr_or(HTTP_BIND_VAR, DEFAULT_HTTP_BIND)?;
        let allow_patient = env.bool_or(rule_attributes::ALLOW_PATIENT_VAR, false)?;
        let rule_attributes = match env.get(rule_attributes::VAR) {
            Some("none") => RuleAttributes::default(),
            Some(list) => {
                RuleAttributes::parse(list, allow_patient).map_err(|e| ConfigError::invalid(rule_attributes::VAR, e))?
            }
            None => RuleAttributes::default_list(),
        };
        Ok(Self {
            nats_url: env.get_or("NATS_URL", "nats://127.0.0.1:4222").to_owned(),
            spool_dir: env.path_or("BIDSFLUX_SPOOL_DIR", "/var/lib/bidsflux/spool"),
            dicom_bind,
            ae_title,
            max_pdu,
            dicom_timeout,
            max_associations,
            shutdown_grace: env.duration_or("BIDSFLUX_SHUTDOWN_GRACE", Duration::from_secs(10))?,
            access,
            tls,
            spool_min_free,
            http_bind,
            rule_attributes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> Env {
        Env::from_pairs([(ACCEPT_ANY_VAR, "true")])
    }

    #[test]
    fn defaults() {
        let c = Config::from_env(&dev()).unwrap();
        assert_eq!(c.ae_title, "BIDSFLUX");
        assert_eq!(c.dicom_bind.port(), 11112);
        assert_eq!(c.max_pdu, 65536);
        assert_eq!(c.spool_dir, PathBuf::from("/var/lib/bidsflux/spool"));
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(c.access, Policy::AcceptAny { our_ae: "BIDSFLUX".into() });
        assert!(c.tls.is_none());
        assert_eq!(c.spool_min_free, 2 << 30);
        assert_eq!(c.http_bind, Some(SocketAddr::from(([0, 0, 0, 0], 9464))));
        let c = Config::from_env(&dev().with(SPOOL_MIN_FREE_VAR, "500MiB").with(HTTP_BIND_VAR, "off")).unwrap();
        assert_eq!(c.spool_min_free, 500 << 20);
        assert_eq!(c.http_bind, None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("3 KiB"), Ok(3 << 10));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("2GB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn denies_by_default() {
        let e = Config::from_env(&Env::default()).unwrap_err().to_string();
        assert!(e.contains(ALLOWLIST_VAR) && e.contains(ACCEPT_ANY_VAR), "{e}");
        let e = Config::from_env(&Env::from_pairs([(ACCEPT_ANY_VAR, "false")])).unwrap_err().to_string();
        assert!(e.contains("denies by default"), "{e}");
    }

    #[test]
    fn allow_lists_from_the_variable_and_the_file_are_merged() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("allow.txt");
        std::fs::write(&file, "# site scanners\nCT1@10.1.0.0/16=ARCHIVE\n").unwrap();
        let env = Env::from_pairs([
            (ALLOWLIST_VAR, "SCANNER1@10.0.0.0/24=BIDSFLUX,BIDSFLUX2;MRI2=BIDSFLUX"),
            (ALLOWLIST_FILE_VAR, file.to_str().unwrap()),
        ]);
        let Policy::AllowList(entries) = Config::from_env(&env).unwrap().access else { panic!("not an allow-list") };
        let callers: Vec<&str> = entries.iter().map(|e| e.calling_ae.as_str()).collect();
        assert_eq!(callers, ["SCANNER1", "MRI2", "CT1"]);

        std::fs::write(&file, "CT1\nCT2@nowhere\n").unwrap();
        let e =
            Config::from_env(&Env::from_pairs([(ALLOWLIST_FILE_VAR, file.to_str().unwrap())])).unwrap_err().to_string();
        assert!(e.contains(ALLOWLIST_FILE_VAR) && e.contains("line 2 \"CT2@nowhere\""), "{e}");
        let e = Config::from_env(&Env::from_pairs([(ALLOWLIST_VAR, "MRI2"), (ACCEPT_ANY_VAR, "true")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(ACCEPT_ANY_VAR), "{e}");
    }

    #[test]
    fn errors_name_the_variable() {
        for (var, value) in [
            ("BIDSFLUX_AE_TITLE", "A_TITLE_WAY_TOO_LONG"),
            ("BIDSFLUX_MAX_PDU", "100"),
            ("BIDSFLUX_MAX_PDU", "lots"),
            ("BIDSFLUX_DICOM_BIND", "localhost"),
            ("BIDSFLUX_DICOM_TIMEOUT", "0"),
            ("BIDSFLUX_MAX_ASSOCIATIONS", "0"),
            ("BIDSFLUX_SHUTDOWN_GRACE", "soon"),
            (ALLOWLIST_VAR, "MRI2@10.0.0.0/33"),
            (ALLOWLIST_FILE_VAR, "/nonexistent/allow-list"),
            (ACCEPT_ANY_VAR, "maybe"),
            ("BIDSFLUX_DICOM_TLS_CERT_FILE", "/nonexistent/cert.pem"),
            (SPOOL_MIN_FREE_VAR, "lots"),
            (HTTP_BIND_VAR, "localhost"),
        ] {
            let e = Config::from_env(&dev().with(var, value)).unwrap_err().to_string();
            assert!(e.contains(var), "{var}={value}: {e}");
        }
    }
}
