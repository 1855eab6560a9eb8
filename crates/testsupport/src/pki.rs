//! Test certificates made with the `openssl` program: a CA, and a server certificate (for
//! `localhost` and `127.0.0.1`) and a client certificate it signed.

use std::path::PathBuf;

/// A test CA, and a server and a client certificate it signed (RSA: DCMTK's default BCP 195
/// profile wants ECDHE-RSA with AES-GCM, which rustls offers).
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Makes the CA and the certificates with `openssl` in a temp dir.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = std::process::Command::new("openssl").args(args).current_dir(dir.path()).output()?;
            anyhow::ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=bidsflux test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])?;
        for (name, ext) in [
            ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.path().join(format!("{name}.ext")), ext)?;
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ])?;
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ])?;
        }
        Ok(Self { dir })
    }

    /// Path of one of the files: `ca.crt`, `ca.key`, `server.crt`, `server.key`, `client.crt`, `client.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// [`Pki::path`] as a string, for environment variables and command lines.
    pub fn p(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}
