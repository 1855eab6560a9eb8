//! Writing the git-annex branch directly.
//!
//! What `datalad add-archive-content` and `git annex initremote` record, the
//! indexer writes itself, in one commit on `git-annex` made by one
//! `git fast-import`: `uuid.log`, `remote.log`, `preferred-content.log`, the
//! location log of every key (`<hashdirlower>/<KEY>.log`) and the URL log of
//! every file inside the archive (`<hashdirlower>/<KEY>.log.web`, with
//! DataLad's `dl+archive:` URLs). The formats are those git-annex
//! 10.20230126 writes itself (TOOLCHAIN.md, "What `datalad
//! add-archive-content` leaves behind").
//!
//! Existing logs are merged, not overwritten: a line for the same repository
//! (or URL) is replaced, other lines are kept, so indexing on top of an
//! existing dataset keeps what others recorded.
//!
//! Apply only when git-annex's journal is empty (after `git annex merge`):
//! this writes the branch, not the journal.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use md5::{Digest as _, Md5};

use crate::git::{Git, GitError};

/// UUID of DataLad's archives special remote (fixed by DataLad).
pub const DATALAD_ARCHIVES_UUID: &str = "c04eb54b-4b4e-5755-8436-866b043170fa";

/// The branch this module writes.
const BRANCH: &str = "refs/heads/git-annex";

/// `xxx/yyy/`: the first 3 and next 3 hex digits of md5(key), git-annex's
/// `hashDirLower`, where the branch keeps a key's logs.
pub fn hash_dir_lower(key: &str) -> String {
    let h = hex::encode(Md5::digest(key.as_bytes()));
    format!("{}/{}/", &h[0..3], &h[3..6])
}

/// `ab/cd/`: git-annex's `hashDirMixed` of `key`, the two directories under
/// `.git/annex/objects/` where a locked file's symlink points.
///
/// md5(key) read as little-endian 32-bit words; the first word spelled with
/// git-annex's 32-letter alphabet (5 bits per letter, taken every 6 bits),
/// letters swapped in pairs, the first 4 kept.
pub fn hash_dir_mixed(key: &str) -> String {
    const LETTERS: &[u8; 32] = b"0123456789zqjxkmvwgpfZQJXKMVWGPF";
    let d = Md5::digest(key.as_bytes());
    let w = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    let c: Vec<u8> = (0..4).map(|x| LETTERS[((w >> (6 * x)) & 31) as usize]).collect();
    let s = [c[1], c[0], c[3], c[2]];
    format!("{}{}/{}{}/", s[0] as char, s[1] as char, s[2] as char, s[3] as char)
}

/// Escapes a `remote.log` value like git-annex: whitespace and `&` become `&<code point>;`.
pub fn escape_config_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_whitespace() || c == '&' {
            let _ = write!(out, "&{};", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// A git-annex log timestamp (`<seconds>.<nanoseconds>s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    secs: u64,
    nanos: u32,
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Self { secs: d.as_secs(), nanos: d.subsec_nanos() }
    }

    /// Whole seconds since the epoch (for commit dates).
    pub fn secs(self) -> u64 {
        self.secs
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}s", self.secs, self.nanos)
    }
}

/// One line of a log and what it is about (a repository UUID or a URL):
/// a new line replaces an existing one about the same thing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    about: String,
    text: String,
}

/// Lines to record on the git-annex branch, by file.
#[derive(Debug, Clone)]
pub struct BranchUpdate {
    files: BTreeMap<String, Vec<Line>>,
    at: Timestamp,
}

impl BranchUpdate {
    /// An empty update whose lines carry timestamp `at`.
    pub fn new(at: Timestamp) -> Self {
        Self { files: BTreeMap::new(), at }
    }

    fn t(&self) -> Timestamp {
        self.at
    }

    fn add(&mut self, path: String, about: &str, text: String) {
        let lines = self.files.entry(path).or_default();
        lines.retain(|l| l.about != about);
        lines.push(Line { about: about.to_owned(), text });
    }

    /// Names a repository in `uuid.log`.
    pub fn describe(&mut self, uuid: &str, description: &str) {
        let text = format!("{uuid} {description} timestamp={}", self.t());
        self.add("uuid.log".into(), uuid, text);
    }

    /// Configures a special remote in `remote.log` (keys are written sorted, like git-annex).
    pub fn remote(&mut self, uuid: &str, config: &BTreeMap<&str, String>) {
        let mut text = uuid.to_owned();
        for (k, v) in config {
            let _ = write!(text, " {k}={}", escape_config_value(v));
        }
        let _ = write!(text, " timestamp={}", self.t());
        self.add("remote.log".into(), uuid, text);
    }

    /// Sets what a repository wants in `preferred-content.log`.
    pub fn wanted(&mut self, uuid: &str, expression: &str) {
        let text = format!("{uuid} {expression} timestamp={}", self.t());
        self.add("preferred-content.log".into(), uuid, text);
    }

    /// Marks a repository dead in `trust.log` (like `git annex dead`).
    pub fn dead(&mut self, uuid: &str) {
        let text = format!("{uuid} X timestamp={}", self.t());
        self.add("trust.log".into(), uuid, text);
    }

    /// Records that repository `uuid` has the content of `key` (location log).
    pub fn present(&mut self, key: &str, uuid: &str) {
        let text = format!("{} 1 {uuid}", self.t());
        self.add(format!("{}{key}.log", hash_dir_lower(key)), uuid, text);
    }

    /// Records a URL of `key` (URL log), e.g. DataLad's `:dl+archive:...`.
    pub fn url(&mut self, key: &str, url: &str) {
        let text = format!("{} 1 {url}", self.t());
        self.add(format!("{}{key}.log.web", hash_dir_lower(key)), url, text);
    }

    /// Paths of the files this update writes.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// The new content of `path` given its current content.
    fn merged(&self, path: &str, existing: &str) -> String {
        let new = self.files.get(path).map(Vec::as_slice).unwrap_or_default();
        let top_level = !path.contains('/');
        let mut out = String::new();
        for line in existing.lines().filter(|l| !l.trim().is_empty()) {
            // Top-level logs start with the UUID; key logs are `<time> <status> <uuid or url>`.
            let about = if top_level { line.split(' ').next() } else { line.splitn(3, ' ').nth(2) };
            if !new.iter().any(|n| Some(n.about.as_str()) == about) {
                out.push_str(line);
                out.push('\n');
            }
        }
        for n in new {
            out.push_str(&n.text);
            out.push('\n');
        }
        out
    }

    /// Commits the update on top of `git-annex` in the repository at `repo`
    /// (creating the branch if it has none).
    pub async fn apply(&self, git: &Git, repo: &Path, message: &str) -> Result<(), GitError> {
        if self.files.is_empty() {
            return Ok(());
        }
        let existing = read_existing(git, repo, self.paths()).await?;
        // A new dataset has no branch yet: this update creates it (what
        // `git annex init` would, without running git-annex).
        let exists = git.run(repo, &["rev-parse", "--verify", "-q", BRANCH]).await.is_ok();
        let id = git.identity();
        let mut stream = Vec::new();
        let data = |out: &mut Vec<u8>, bytes: &[u8]| {
            out.extend_from_slice(format!("data {}\n", bytes.len()).as_bytes());
            out.extend_from_slice(bytes);
            out.push(b'\n');
        };
        stream.extend_from_slice(format!("commit {BRANCH}\n").as_bytes());
        stream
            .extend_from_slice(format!("committer {} <{}> {} +0000\n", id.name, id.email, self.t().secs()).as_bytes());
        data(&mut stream, message.as_bytes());
        if exists {
            stream.extend_from_slice(format!("from {BRANCH}^0\n").as_bytes());
        }
        for path in self.paths() {
            let content = self.merged(path, existing.get(path).map(String::as_str).unwrap_or_default());
            stream.extend_from_slice(format!("M 100644 inline {path}\n").as_bytes());
            data(&mut stream, content.as_bytes());
        }
        stream.extend_from_slice(b"done\n");
        git.run_input(repo, &["fast-import", "--quiet", "--done"], stream).await?;
        Ok(())
    }
}

/// The current content of `paths` on the git-annex branch (absent ones are left out).
async fn read_existing<'a>(
    git: &Git,
    repo: &Path,
    paths: impl Iterator<Item = &'a str>,
) -> Result<BTreeMap<String, String>, GitError> {
    let paths: Vec<&str> = paths.collect();
    let mut input = Vec::new();
    for p in &paths {
        input.extend_from_slice(format!("{BRANCH}:{p}\n").as_bytes());
    }
    let out = git.run_input(repo, &["cat-file", "--batch"], input).await?;
    let mut found = BTreeMap::new();
    let mut rest = out.as_slice();
    for p in paths {
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else { break };
        let header = String::from_utf8_lossy(&rest[..nl]).into_owned();
        rest = &rest[nl + 1..];
        if header.ends_with(" missing") {
            continue;
        }
        let size: usize = header.rsplit(' ').next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let end = size.min(rest.len());
        found.insert(p.to_owned(), String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = rest.get(end + 1..).unwrap_or_default();
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_hash_dirs_match_git_annex_examinekey() {
        // `git annex examinekey --format='${hashdirmixed}' KEY`, git-annex 10.20230126.
        assert_eq!(hash_dir_mixed("MD5E-s8000--0123456789abcdef0123456789abcdef.dcm"), "86/pq/");
        assert_eq!(hash_dir_mixed("MD5E-s1000--cfcd208495d565ef66e7dff9f98764da.dcm"), "FP/k7/");
        assert_eq!(hash_dir_mixed("MD5E-s1001--c4ca4238a0b923820dcc509a6f75849b.dcm"), "pZ/Mq/");
        assert_eq!(hash_dir_mixed("MD5E-s1002--c81e728d9d4c2f636f067f89cc14862c.dcm"), "4m/49/");
        assert_eq!(hash_dir_mixed("MD5E-s1003--eccbc87e4b5ce2fe28308fd9f2a7baf3.dcm"), "2P/k3/");
        assert_eq!(hash_dir_mixed("MD5E-s1004--a87ff679a2f3e71d9181a67b7542122c.dcm"), "qv/QV/");
        assert_eq!(hash_dir_mixed("MD5E-s1005--e4da3b7fbbce2345d7772b0674a318d5.dcm"), "m1/kq/");
    }

    /// All 300 keys of the examinekey run above (not only the ones listed) agree.
    #[tokio::test]
    async fn mixed_hash_dirs_agree_with_git_annex_on_many_keys() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<String> = (0..300)
            .map(|i: u32| format!("MD5E-s{}--{:032x}.dcm", 1000 + i, u128::from(i) * 0x9E37_79B9_7F4A_7C15))
            .collect();
        let out =
            tokio::process::Command::new("git").arg("init").arg("-q").current_dir(dir.path()).output().await.unwrap();
        assert!(out.status.success());
        let mut child = tokio::process::Command::new("git")
            .args(["annex", "examinekey", "--batch", "--format=${hashdirmixed}\\n"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stdin, keys.join("\n").as_bytes()).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stdin, b"\n").await.unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        let expected: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
        assert_eq!(expected.len(), keys.len());
        for (key, want) in keys.iter().zip(&expected) {
            assert_eq!(&hash_dir_mixed(key), want, "{key}");
        }
    }

    #[test]
    fn hash_dirs_match_git_annex() {
        // Measured with git-annex 10.20230126 (`setpresentkey` then `git ls-tree git-annex`).
        assert_eq!(hash_dir_lower("MD5E-s3--abc.7z"), "ab6/e22/");
        assert_eq!(hash_dir_lower("MD5E-s9303--e5fd25aaacadb8c21a4faf5489750c82.4.7z"), "5af/8f1/");
        assert_eq!(hash_dir_lower("MD5E-s2001--41264f2a09f7a73585d0eccea170dbda.1.dcm"), "08f/efc/");
    }

    #[test]
    fn config_values_are_escaped_like_git_annex() {
        // `initremote ... fileprefix='a b&c=d/'` is logged as `fileprefix=a&32;b&38;c=d/`.
        assert_eq!(escape_config_value("a b&c=d/"), "a&32;b&38;c=d/");
        assert_eq!(escape_config_value("plain/1.2.3/"), "plain/1.2.3/");
    }

    fn at() -> Timestamp {
        Timestamp { secs: 1_700_000_000, nanos: 5 }
    }

    #[test]
    fn lines_have_git_annex_formats() {
        let mut u = BranchUpdate::new(at());
        u.describe("U1", "s3-dicoms");
        let config = BTreeMap::from([("type", "S3".to_owned()), ("bucket", "b".to_owned())]);
        u.remote("U1", &config);
        u.wanted("U1", "include=*7z or include=*zip");
        u.present("MD5E-s3--abc.7z", "U1");
        u.url("MD5E-s3--abc.7z", ":dl+archive:K#path=a/b&size=3");
        u.dead("U2");
        // `git annex dead here` writes `<uuid> X timestamp=...`.
        assert_eq!(u.merged("trust.log", ""), "U2 X timestamp=1700000000.000000005s\n");
        assert_eq!(u.merged("uuid.log", ""), "U1 s3-dicoms timestamp=1700000000.000000005s\n");
        assert_eq!(u.merged("remote.log", ""), "U1 bucket=b type=S3 timestamp=1700000000.000000005s\n");
        assert_eq!(
            u.merged("preferred-content.log", ""),
            "U1 include=*7z or include=*zip timestamp=1700000000.000000005s\n"
        );
        assert_eq!(u.merged("ab6/e22/MD5E-s3--abc.7z.log", ""), "1700000000.000000005s 1 U1\n");
        assert_eq!(
            u.merged("ab6/e22/MD5E-s3--abc.7z.log.web", ""),
            "1700000000.000000005s 1 :dl+archive:K#path=a/b&size=3\n"
        );
    }

    #[test]
    fn merging_replaces_lines_about_the_same_thing_only() {
        let mut u = BranchUpdate::new(at());
        u.describe("U1", "new name");
        u.present("K", "U1");
        let existing = "U0 here timestamp=1s\nU1 old name timestamp=1s\n";
        assert_eq!(
            u.merged("uuid.log", existing),
            "U0 here timestamp=1s\nU1 new name timestamp=1700000000.000000005s\n"
        );
        let path = format!("{}K.log", hash_dir_lower("K"));
        assert_eq!(u.merged(&path, "1s 1 U0\n1s 0 U1\n"), "1s 1 U0\n1700000000.000000005s 1 U1\n");
    }
}
