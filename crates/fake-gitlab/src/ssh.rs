//! Git over SSH: OpenSSH's `sshd` in front of the repositories. Every key
//! logs in to a forced command that plays gitlab-shell: it asks the fake
//! ([`allowed`], where gitlab-shell asks GitLab's internal API) whether the
//! key's user may fetch or push, then runs git with the protected-branch rules.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hyper::Response;

use crate::permissions::AuthUser;
use crate::replies::{Body, text_response};
use crate::shared::{Shared, lock};
use crate::state::SshKey;

/// Path of the fake's stand-in for gitlab-shell's internal API (not a GitLab path).
pub(crate) const SSH_ALLOWED_PATH: &str = "/-/fake-gitlab/ssh-allowed";

/// The forced command of every SSH key: what gitlab-shell does for a git
/// command over SSH. It asks the fake whether the key's user may run it, then
/// runs it on the repository with the protected-branch rules for the
/// pre-receive hook.
pub(crate) const SSH_COMMAND: &str = r#"#!/bin/sh
# Installed by bidsflux's fake GitLab (crates/fake-gitlab/src/ssh.rs).
# $1: API URL, $2: repositories, $3: key id; SSH_ORIGINAL_COMMAND is e.g.
# git-receive-pack '/group/project.git'.
set -f
cmd=${SSH_ORIGINAL_COMMAND%% *}
repo=${SSH_ORIGINAL_COMMAND#"$cmd"}
repo=${repo# }; repo=${repo#"'"}; repo=${repo%"'"}; repo=${repo#/}; repo=${repo%.git}
answer=$(curl -sS -G "$1/-/fake-gitlab/ssh-allowed" --data-urlencode "key_id=$3"   --data-urlencode "service=$cmd" --data-urlencode "project=$repo") || {
  echo "GitLab: the API is unreachable" >&2; exit 1; }
case "$answer" in
  ok*) ;;
  *) printf 'GitLab: %s
' "${answer#denied: }" >&2; exit 1 ;;
esac
FAKE_GITLAB_PROTECTED=$(printf '%s
' "$answer" | tail -n +2)
export FAKE_GITLAB_PROTECTED
cd "$2" || exit 1
exec git "${cmd#git-}" "$repo.git"
"#;

/// An `sshd` serving the fake's repositories as GitLab's SSH endpoint
/// (`ssh://<user>@127.0.0.1:<port>/<path_with_namespace>.git`); stopped on drop.
#[derive(Debug)]
pub struct FakeGitlabSsh {
    child: tokio::process::Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The user to log in as (this process's user: sshd serves only existing
    /// users, GitLab's is `git`).
    pub user: String,
    /// A known_hosts file with the server's host key.
    pub known_hosts: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeGitlabSsh {
    /// `ssh://<user>@127.0.0.1:<port>/<path_with_namespace>.git`.
    pub fn url(&self, path_with_namespace: &str) -> String {
        format!("ssh://{}@127.0.0.1:{}/{path_with_namespace}.git", self.user, self.port)
    }
}

impl Drop for FakeGitlabSsh {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The fake's stand-in for gitlab-shell's `/api/v4/internal/allowed`:
/// the forced command of an SSH key asks whether its user may run
/// `service` on `project`. Answers `ok` and the protected-branch lines
/// for the pre-receive hook, or `denied: <GitLab's message>` (always 200,
/// so the shell script reads the message).
pub(crate) fn allowed(shared: &Shared, query: Option<&str>) -> Response<Body> {
    let params: std::collections::HashMap<String, String> =
        form_urlencoded::parse(query.unwrap_or("").as_bytes()).into_owned().collect();
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or_default();
    let push = match get("service") {
        "git-receive-pack" => true,
        "git-upload-pack" => false,
        _ => return text_response(200, "denied: only git fetch and push are served over SSH", false),
    };
    let st = lock(&shared.state);
    let key_id: u64 = get("key_id").parse().unwrap_or(0);
    let Some(user) =
        st.ssh_keys.iter().find(|k| k.id == key_id).and_then(|k| st.users.iter().find(|u| u.id == k.user_id)).cloned()
    else {
        return text_response(200, "denied: unknown SSH key", false);
    };
    // SSH keys are not scoped: the user's role decides.
    let scopes = vec!["read_repository".to_owned(), "write_repository".to_owned()];
    match st.git_grant(get("project").trim_end_matches(".git"), AuthUser { user, scopes, token_id: 0 }, push) {
        Ok(grant) => text_response(200, &format!("ok\n{}", grant.protected), false),
        Err((_, message)) => text_response(200, &format!("denied: {message}"), false),
    }
}

/// Starts `sshd` for the keys registered so far (see `FakeGitlab::start_ssh`).
pub(crate) async fn start(shared: &Shared) -> anyhow::Result<FakeGitlabSsh> {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.is_file() {
        anyhow::bail!("git over SSH needs OpenSSH's sshd (apt-get install openssh-server)");
    }
    // sshd's privilege separation directory (needed when run as root; a
    // non-root sshd serves only its own user and does without).
    let _ = std::fs::create_dir_all("/run/sshd");
    let dir = tempfile::Builder::new().prefix("fake-gitlab-ssh-").tempdir()?;
    let host_key = dir.path().join("host_ed25519");
    let out = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let command = dir.path().join("gitlab-shell");
    std::fs::write(&command, SSH_COMMAND)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&command, std::fs::Permissions::from_mode(0o755))?;
    }
    let keys = lock(&shared.state).ssh_keys.clone();
    let mut authorized = String::new();
    // Signing-only keys do not log in.
    for SshKey { id, key, .. } in keys.into_iter().filter(|k| k.usage_type != "signing") {
        authorized.push_str(&format!(
            "restrict,command=\"{} {} {} {id}\" {key}\n",
            command.display(),
            shared.url,
            shared.repos.display()
        ));
    }
    let authorized_keys = dir.path().join("authorized_keys");
    std::fs::write(&authorized_keys, authorized)?;
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            let out = std::process::Command::new("id").arg("-un").output().ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "root".to_owned());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let config = dir.path().join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             PermitRootLogin forced-commands-only\nAllowUsers {user}\nLogLevel ERROR\n\
             AcceptEnv GIT_PROTOCOL\n",
            host_key.display(),
            dir.path().join("sshd.pid").display(),
            authorized_keys.display()
        ),
    )?;
    let child = tokio::process::Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let public = std::fs::read_to_string(host_key.with_extension("pub"))?;
    let host_key_line = public.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key_line}\n"))?;
    let ssh = FakeGitlabSsh { child, port, user, known_hosts, _dir: dir };
    // Ready when it accepts connections.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(ssh);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("sshd did not listen on 127.0.0.1:{port} within 5 s")
}
