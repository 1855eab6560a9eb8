//! SSH keys of users: `GET /users/:id/keys` (id or username), `POST
//! /users/:id/keys` (admin; `title`, `key`, `expires_at`, `usage_type`).
//! A key must be an OpenSSH public key (`ssh-ed25519 AAAA… comment`) and is
//! unique across the instance: GitLab compares SHA-256 fingerprints, the
//! fake compares the key blobs they are computed from.

use base64::Engine as _;
use serde_json::{Value, json};

use crate::clock::{is_date, now_iso, today};
use crate::params::{ParamError, Params};
use crate::replies::{ApiErr, Reply, created};
use crate::state::{SshKey, State, User};

/// The key types GitLab accepts (`Gitlab::SSHPublicKey`).
const KEY_TYPES: [&str; 8] = [
    "ssh-rsa",
    "ssh-dss",
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "sk-ssh-ed25519@openssh.com",
];

/// The base64 blob of an OpenSSH public key (`<type> <base64> [comment]`), if
/// `key` is one: a known type whose blob decodes and starts with that type,
/// as every OpenSSH key blob does.
fn key_blob(key: &str) -> Option<&str> {
    let mut parts = key.split_whitespace();
    let ty = parts.next()?;
    let blob = parts.next()?;
    if !KEY_TYPES.contains(&ty) {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(blob).ok()?;
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    (bytes.get(4..end)? == ty.as_bytes() && bytes.len() > end).then_some(blob)
}

/// `expires_at` (a date, or a date and time) as GitLab shows it: `2030-01-31T00:00:00.000Z`.
fn expiry_param(params: &Params) -> Result<Option<String>, ParamError> {
    let Some(e) = params.str("expires_at").filter(|s| !s.is_empty()) else { return Ok(None) };
    let (date, time) = match e.split_once(['T', ' ']) {
        Some((d, t)) => (d, t),
        None => (e.as_str(), ""),
    };
    let hms = time.get(..8).unwrap_or("00:00:00");
    let hms_ok = hms.len() == 8
        && hms.bytes().enumerate().all(|(i, c)| if i == 2 || i == 5 { c == b':' } else { c.is_ascii_digit() });
    if !is_date(date) || !(time.is_empty() || hms_ok) {
        return Err(ParamError::new(400, "expires_at is invalid"));
    }
    Ok(Some(format!("{date}T{hms}.000Z")))
}

fn key_json(k: &SshKey) -> Value {
    json!({
        "id": k.id,
        "title": k.title,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "last_used_at": null,
        "key": k.key,
        "usage_type": k.usage_type,
    })
}

impl State {
    /// `GET /users/:id/keys`: the user's keys.
    pub(crate) fn list_user_keys(&self, id: &str) -> Result<Reply, ApiErr> {
        let user = self.user_by_ref(id).ok_or_else(|| ApiErr::not_found("User"))?;
        Ok(Reply::List(self.ssh_keys.iter().filter(|k| k.user_id == user.id).map(key_json).collect()))
    }

    /// `POST /users/:id/keys` (admin): adds a key to a user.
    pub(crate) fn create_user_key(&mut self, u: &User, id: &str, params: &Params) -> Result<Reply, ApiErr> {
        let id: u64 = id.parse().map_err(|_| ParamError::new(400, "id is invalid"))?;
        let title = params.required("title")?;
        let key = params.required("key")?;
        let usage_type = params.str("usage_type").unwrap_or_else(|| "auth_and_signing".to_owned());
        if !matches!(usage_type.as_str(), "auth" | "signing" | "auth_and_signing") {
            return Err(ParamError::invalid("usage_type").into());
        }
        let expires_at = expiry_param(params)?;
        if !u.admin {
            return Err(ApiErr::forbidden());
        }
        let user_id = self.users.iter().find(|x| x.id == id).map(|x| x.id).ok_or_else(|| ApiErr::not_found("User"))?;
        if title.chars().count() > 255 {
            return Err(ApiErr::validation("title", "is too long (maximum is 255 characters)"));
        }
        // GitLab keeps the key without line breaks and extra blanks.
        let key = key.split_whitespace().collect::<Vec<_>>().join(" ");
        let Some(blob) = key_blob(&key).filter(|_| key.len() <= 5000) else {
            return Err(ApiErr {
                status: 400,
                body: json!({ "message": { "key": ["is invalid"], "fingerprint_sha256": ["cannot be generated"] } }),
            });
        };
        if self.ssh_keys.iter().any(|k| key_blob(&k.key) == Some(blob)) {
            return Err(ApiErr::validation("fingerprint_sha256", "has already been taken"));
        }
        if expires_at.as_deref().is_some_and(|e| e.get(..10).is_some_and(|d| d < today().as_str())) {
            return Err(ApiErr::validation("key", "has expired"));
        }
        let k = SshKey { id: self.next(), user_id, title, key, usage_type, expires_at, created_at: now_iso() };
        self.ssh_keys.push(k.clone());
        created(key_json(&k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys() {
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILV1DDQ3lYsqSZko3PKYo568Cp7CNN9CI1DY8fT2Cgeh me@host";
        assert_eq!(key_blob(ed), Some("AAAAC3NzaC1lZDI1NTE5AAAAILV1DDQ3lYsqSZko3PKYo568Cp7CNN9CI1DY8fT2Cgeh"));
        // The blob of another type, an unknown type, no blob, not base64.
        assert_eq!(key_blob("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAILV1DDQ3lYsqSZko3PKYo568Cp7CNN9CI1DY8fT2Cgeh"), None);
        assert_eq!(key_blob("ssh-foo AAAAC3NzaC1lZDI1NTE5AAAAILV1DDQ3lYsqSZko3PKYo568Cp7CNN9CI1DY8fT2Cgeh"), None);
        assert_eq!(key_blob("ssh-ed25519"), None);
        assert_eq!(key_blob("ssh-ed25519 not-base64!"), None);
        assert_eq!(key_blob("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"), None);
    }
}
