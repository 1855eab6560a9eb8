//! Configuration of the receiver.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bidsflux_config::{ConfigError, Env};

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
    /// Our AE title (`BIDSFLUX_AE_TITLE`, default `BIDSFLUX`, 1–16 characters): associations whose
    /// called AE title differs are rejected, so a scanner misconfigured for another node fails loudly
    /// instead of sending data to the wrong place.
    pub ae_title: String,
    /// Maximum PDU length we accept (`BIDSFLUX_MAX_PDU`, default 65536 bytes, 4096..=4194304). Bigger
    /// PDUs mean fewer reads per instance; each open association holds about one PDU in memory, so
    /// this bounds memory per association (DCMTK's storescp uses 16384, its maximum is 131072).
    pub max_pdu: u32,
    /// How long a peer may stay silent, during negotiation or between PDUs, before its association
    /// is aborted (`BIDSFLUX_DICOM_TIMEOUT`, default 120 s): frees what vanished peers hold.
    pub dicom_timeout: Duration,
    /// Most associations served at once (`BIDSFLUX_MAX_ASSOCIATIONS`, default 64); further
    /// connections wait in the listen backlog. Bounds open files and memory.
    pub max_associations: usize,
    /// On shutdown, how long open associations may go on before they are aborted
    /// (`BIDSFLUX_SHUTDOWN_GRACE`, default 10 s). Stores being acknowledged still finish.
    pub shutdown_grace: Duration,
}

impl Config {
    /// Reads the configuration; errors name the variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let dicom_bind = env.parse_or("BIDSFLUX_DICOM_BIND", SocketAddr::from(([0, 0, 0, 0], 11112)))?;
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
        Ok(Self {
            nats_url: env.get_or("NATS_URL", "nats://127.0.0.1:4222").to_owned(),
            spool_dir: env.path_or("BIDSFLUX_SPOOL_DIR", "/var/lib/bidsflux/spool"),
            dicom_bind,
            ae_title,
            max_pdu,
            dicom_timeout,
            max_associations,
            shutdown_grace: env.duration_or("BIDSFLUX_SHUTDOWN_GRACE", Duration::from_secs(10))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::from_env(&Env::default()).unwrap();
        assert_eq!(c.ae_title, "BIDSFLUX");
        assert_eq!(c.dicom_bind.port(), 11112);
        assert_eq!(c.max_pdu, 65536);
        assert_eq!(c.spool_dir, PathBuf::from("/var/lib/bidsflux/spool"));
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
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
        ] {
            let e = Config::from_env(&Env::from_pairs([(var, value)])).unwrap_err().to_string();
            assert!(e.contains(var), "{var}={value}: {e}");
        }
    }
}
