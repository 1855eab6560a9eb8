//! The site's swarm secrets, listed once.
//!
//! The services read them as files under [`DIR`] (where swarm mounts them), the stack declares
//! the ones its services mount (`stack/bidsflux-stack.yml`, `secrets:`; a provisioner test
//! checks that both lists agree), and `bidsflux-provisioner` creates them: the random ones with
//! `secrets`, the GitLab tokens and SSH key with `gitlab`, the runners' `config.toml` with
//! `runners`.

use std::path::PathBuf;

/// Where swarm mounts a service's secrets.
pub const DIR: &str = "/run/secrets";

/// The S3 access key id (MinIO's root user; the uploader's and indexer's credentials).
pub const S3_ID: &str = "s3_id";
/// The S3 secret access key.
pub const S3_SECRET: &str = "s3_secret";
/// GitLab's initial root password.
pub const GITLAB_ROOT_PASSWORD: &str = "gitlab_root_password";
/// The personal access token of `dicom_bot`, the indexer's GitLab user.
pub const DICOM_BOT_GITLAB_TOKEN: &str = "dicom_bot_gitlab_token";
/// The personal access token of `bids_bot`, the BIDS pipelines' user (a CI variable, too).
pub const BIDS_BOT_GITLAB_TOKEN: &str = "bids_bot_gitlab_token";
/// dicom_bot's SSH private key (its public key is registered on the GitLab user).
pub const DICOM_BOT_SSH_KEY: &str = "dicom_bot_ssh_key";
/// bids_bot's SSH private key: the BIDS pipelines' `BOT_SSH_KEY` CI variable.
pub const BIDS_BOT_SSH_KEY: &str = "bids_bot_ssh_key";
/// GitLab's SSH host keys, in `known_hosts` format.
pub const SSH_KNOWN_HOSTS: &str = "ssh_known_hosts";
/// `config.toml` of the data server's runner (`dind`).
pub const GITLAB_RUNNER_DATA_CONFIG: &str = "gitlab_runner_data_config";
/// `config.toml` of the processing server's runners (untagged, `bids`, `preproc`).
pub const GITLAB_RUNNER_PROC_CONFIG: &str = "gitlab_runner_proc_config";

/// Where a secret's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Random, made by `bidsflux-provisioner secrets`: `len` characters of [`ALPHABET`].
    Generated {
        /// Characters.
        len: usize,
        /// The operator must keep it (shown once, or written to a file the operator names).
        reveal: bool,
    },
    /// A personal access token GitLab makes for a bot (`bidsflux-provisioner gitlab`).
    GitlabToken,
    /// An SSH key pair made for the bot; the private key is the secret (`gitlab`).
    SshKey,
    /// GitLab's SSH host keys (`gitlab`).
    KnownHosts,
    /// A runner's `config.toml` (`bidsflux-provisioner runners`).
    RunnerConfig,
}

/// Characters of generated values: letters and digits, which GitLab can mask in a CI variable
/// and no shell or URL needs to quote.
pub const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// One secret of the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteSecret {
    /// Its name in swarm, and its file under [`DIR`].
    pub name: &'static str,
    /// Where its value comes from.
    pub origin: Origin,
    /// Whether `stack/bidsflux-stack.yml` declares it (some are only optional there, or feed a
    /// GitLab CI variable instead).
    pub in_stack: bool,
    /// What it is for.
    pub what: &'static str,
}

/// Every secret of the site.
pub const ALL: &[SiteSecret] = &[
    SiteSecret {
        name: S3_ID,
        origin: Origin::Generated { len: 20, reveal: false },
        in_stack: true,
        what: "S3 access key id: MinIO's root user, the uploader's and indexer's credentials",
    },
    SiteSecret {
        name: S3_SECRET,
        origin: Origin::Generated { len: 40, reveal: false },
        in_stack: true,
        what: "S3 secret access key",
    },
    SiteSecret {
        name: GITLAB_ROOT_PASSWORD,
        origin: Origin::Generated { len: 24, reveal: true },
        in_stack: true,
        what: "GitLab's initial root password (read at GitLab's first start)",
    },
    SiteSecret {
        name: DICOM_BOT_GITLAB_TOKEN,
        origin: Origin::GitlabToken,
        in_stack: true,
        what: "dicom_bot's personal access token: the indexer creates projects and pushes with it",
    },
    SiteSecret {
        name: BIDS_BOT_GITLAB_TOKEN,
        origin: Origin::GitlabToken,
        in_stack: false,
        what: "bids_bot's personal access token: the BIDS pipelines' BIDS_API_TOKEN",
    },
    SiteSecret {
        name: DICOM_BOT_SSH_KEY,
        origin: Origin::SshKey,
        in_stack: false,
        what: "dicom_bot's SSH private key (the indexer's git over SSH)",
    },
    SiteSecret {
        name: BIDS_BOT_SSH_KEY,
        origin: Origin::SshKey,
        in_stack: false,
        what: "bids_bot's SSH private key (the BIDS pipelines' BOT_SSH_KEY)",
    },
    SiteSecret {
        name: SSH_KNOWN_HOSTS,
        origin: Origin::KnownHosts,
        in_stack: false,
        what: "GitLab's SSH host keys (SSH_KNOWN_HOSTS)",
    },
    SiteSecret {
        name: GITLAB_RUNNER_DATA_CONFIG,
        origin: Origin::RunnerConfig,
        in_stack: true,
        what: "config.toml of the data server's runner (dind)",
    },
    SiteSecret {
        name: GITLAB_RUNNER_PROC_CONFIG,
        origin: Origin::RunnerConfig,
        in_stack: true,
        what: "config.toml of the processing server's runners (untagged, bids, preproc)",
    },
];

/// The secret called `name`.
pub fn get(name: &str) -> Option<&'static SiteSecret> {
    ALL.iter().find(|s| s.name == name)
}

/// Where a service reads the secret `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(DIR).join(name)
}

/// Version `n` of the secret `name` as rotation names it: `name` itself for 1, else `name_v<n>`.
pub fn versioned(name: &str, n: u32) -> String {
    if n <= 1 { name.to_owned() } else { format!("{name}_v{n}") }
}

/// The version of `name` that `existing` is (`name` → 1, `name_v3` → 3), if it is one.
pub fn version_of(name: &str, existing: &str) -> Option<u32> {
    if existing == name {
        return Some(1);
    }
    existing.strip_prefix(name)?.strip_prefix("_v")?.parse().ok().filter(|&n| n >= 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_versions_round_trip() {
        let mut names: Vec<&str> = ALL.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        assert_eq!(version_of(S3_ID, &versioned(S3_ID, 1)), Some(1));
        assert_eq!(version_of(S3_ID, &versioned(S3_ID, 7)), Some(7));
        assert_eq!(version_of(S3_ID, "s3_id_v1"), None);
        assert_eq!(version_of(S3_ID, "s3_id_vx"), None);
        assert_eq!(version_of(S3_ID, S3_SECRET), None);
        assert_eq!(path(S3_ID), PathBuf::from("/run/secrets/s3_id"));
    }
}
