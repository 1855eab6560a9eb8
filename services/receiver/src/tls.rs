//! DICOM TLS (PS3.15 annex B): the rustls server configuration, from PEM files.
//!
//! When enabled, the listener speaks TLS only: a plain association to it fails
//! in the TLS handshake. With a client CA, peers must present a certificate it
//! signed (mutual TLS).
//!
//! The server certificate and key are read again when their files change
//! ([`ReloadingCert`], checked every `BIDSFLUX_DICOM_TLS_RELOAD_INTERVAL`), so a
//! renewed certificate is served without a restart; new files that do not load
//! (unreadable, or a key that does not fit) leave the previous pair in use.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use bidsflux_config::{ConfigError, Env};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

/// Variable naming the certificate chain (PEM, leaf first).
pub const CERT_VAR: &str = "BIDSFLUX_DICOM_TLS_CERT_FILE";
/// Variable naming the private key (PEM: PKCS#8, PKCS#1 or SEC1).
pub const KEY_VAR: &str = "BIDSFLUX_DICOM_TLS_KEY_FILE";
/// Variable naming the CA certificates that sign client certificates (PEM); enables mutual TLS.
pub const CLIENT_CA_VAR: &str = "BIDSFLUX_DICOM_TLS_CLIENT_CA_FILE";
/// Variable: how often the certificate and key files are checked for a change (default 60 s).
pub const RELOAD_INTERVAL_VAR: &str = "BIDSFLUX_DICOM_TLS_RELOAD_INTERVAL";

/// TLS settings: the files, and the server configuration loaded from them at start.
#[derive(Clone)]
pub struct TlsSettings {
    /// Certificate chain file.
    pub cert_file: PathBuf,
    /// Private key file (never printed).
    pub key_file: PathBuf,
    /// Client CA file, when peers must authenticate.
    pub client_ca_file: Option<PathBuf>,
    /// The loaded configuration, shared by every connection.
    pub server_config: Arc<ServerConfig>,
    /// The certificate it serves, reloaded when the files change.
    pub cert: Arc<ReloadingCert>,
    /// How often the files are checked.
    pub reload_interval: Duration,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("client_ca_file", &self.client_ca_file)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// Reads the TLS variables: `Ok(None)` when TLS is off; errors name the variable.
    pub fn from_env(env: &Env) -> Result<Option<Self>, ConfigError> {
        let cert = env.get(CERT_VAR).map(PathBuf::from);
        let key = env.get(KEY_VAR).map(PathBuf::from);
        let client_ca = env.get(CLIENT_CA_VAR).map(PathBuf::from);
        let (cert_file, key_file) = match (cert, key) {
            (None, None) => {
                if client_ca.is_some() {
                    return Err(ConfigError::invalid(
                        CLIENT_CA_VAR,
                        format!("needs {CERT_VAR} and {KEY_VAR} (TLS is off without them)"),
                    ));
                }
                return Ok(None);
            }
            (Some(_), None) => return Err(ConfigError::invalid(KEY_VAR, format!("must be set with {CERT_VAR}"))),
            (None, Some(_)) => return Err(ConfigError::invalid(CERT_VAR, format!("must be set with {KEY_VAR}"))),
            (Some(c), Some(k)) => (c, k),
        };
        let reload_interval = env.duration_or(RELOAD_INTERVAL_VAR, Duration::from_secs(60))?;
        if reload_interval.is_zero() {
            return Err(ConfigError::invalid(RELOAD_INTERVAL_VAR, "must be more than 0"));
        }
        let cert = Arc::new(ReloadingCert::load(&cert_file, &key_file)?);
        let server_config = server_config(cert.clone(), client_ca.as_deref())?;
        Ok(Some(Self { cert_file, key_file, client_ca_file: client_ca, server_config, cert, reload_interval }))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(var: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConfigError::invalid(var, format!("cannot read certificates from {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ConfigError::invalid(var, format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

/// The certificate chain and key of two PEM files, checked to fit each other.
fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, ConfigError> {
    let certs = certificates(CERT_VAR, cert_file)?;
    // The error of a key file is described without its content.
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        ConfigError::invalid(KEY_VAR, format!("cannot read a private key from {}: {e}", key_file.display()))
    })?;
    CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| ConfigError::invalid(KEY_VAR, format!("the key does not fit the certificate or is unusable: {e}")))
}

/// When the files were last changed (modification time and size of each).
type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(cert_file: &Path, key_file: &Path) -> Stamp {
    let of = |p: &Path| std::fs::metadata(p).map(|m| (m.modified().ok(), m.len())).unwrap_or((None, 0));
    [of(cert_file), of(key_file)]
}

/// The server certificate, served from memory and re-read when its files change.
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' stamp when `current` was loaded from them.
    loaded: Mutex<Stamp>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair; errors name the variable.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, ConfigError> {
        let loaded = stamp(cert_file, key_file);
        let key = certified_key(cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(Arc::new(key)),
            loaded: Mutex::new(loaded),
        })
    }

    /// Re-reads the files if either changed since the last load: `Ok(true)` when a new pair is
    /// served now, `Ok(false)` when nothing changed; on an error the previous pair stays in use
    /// and the next call tries again.
    pub fn reload_if_changed(&self) -> Result<bool, ConfigError> {
        let now = stamp(&self.cert_file, &self.key_file);
        let mut loaded = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *loaded == now {
            return Ok(false);
        }
        let key = certified_key(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
        *loaded = now;
        Ok(true)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

/// Builds the server configuration (TLS 1.2 and 1.3, rustls' safe defaults).
fn server_config(cert: Arc<ReloadingCert>, client_ca: Option<&Path>) -> Result<Arc<ServerConfig>, ConfigError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid(CERT_VAR, format!("cannot set up TLS: {e}")))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(CLIENT_CA_VAR, path)? {
                roots.add(cert).map_err(|e| {
                    ConfigError::invalid(CLIENT_CA_VAR, format!("bad CA certificate in {}: {e}", path.display()))
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(|e| {
                    ConfigError::invalid(CLIENT_CA_VAR, format!("cannot verify clients with {}: {e}", path.display()))
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    Ok(Arc::new(builder.with_cert_resolver(cert)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_files_or_neither() {
        assert!(TlsSettings::from_env(&Env::default()).unwrap().is_none());
        for (var, other) in [(CERT_VAR, KEY_VAR), (KEY_VAR, CERT_VAR), (CLIENT_CA_VAR, CERT_VAR)] {
            let e = TlsSettings::from_env(&Env::from_pairs([(var, "/x.pem")])).unwrap_err().to_string();
            assert!(e.contains(other) || e.contains(var), "{var}: {e}");
        }
    }

    #[test]
    fn unreadable_files_name_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let env = Env::from_pairs([(CERT_VAR, empty.to_str().unwrap()), (KEY_VAR, "/nonexistent/key.pem")]);
        let e = TlsSettings::from_env(&env).unwrap_err().to_string();
        assert!(e.contains(CERT_VAR) && e.contains("no PEM certificate"), "{e}");
    }
}
