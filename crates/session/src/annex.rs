//! git-annex keys.
//!
//! The indexer registers files by key without holding their content, so keys
//! must be exactly what git-annex would compute for the same file: the `MD5E`
//! backend (DataLad's default), `MD5E-s<size>--<md5><ext>`, where `<ext>` is
//! chosen like git-annex's `selectExtension`: the last two extensions of the
//! file name that are at most 4 characters long and alphanumeric.

/// Maximum length of one extension (git-annex's `annex.maxextensionlength` default).
const MAX_EXTENSION_LENGTH: usize = 4;

/// The `MD5E` key of a file named `file_name` (a path is fine: only its last component counts).
pub fn md5e_key(size: u64, md5_hex: &str, file_name: &str) -> String {
    format!("MD5E-s{size}--{}{}", md5_hex.to_ascii_lowercase(), extension(file_name))
}

/// The MD5 (hex) in an `MD5E` key, the inverse of [`md5e_key`]; `None` for
/// another backend or a malformed key.
pub fn md5_of_md5e_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("MD5E-s")?;
    let (_, tail) = rest.split_once("--")?;
    let md5 = tail.get(..32)?;
    md5.bytes().all(|b| b.is_ascii_hexdigit()).then_some(md5)
}

/// The key extension of a file name, e.g. `.dcm`, `.tar.gz`, or empty.
pub fn extension(file_name: &str) -> String {
    let base = file_name.rsplit('/').next().unwrap_or(file_name);
    let Some(first_dot) = base.find('.') else { return String::new() };
    let exts: Vec<&str> = base[first_dot + 1..].split('.').collect();
    let mut picked: Vec<&str> = exts
        .iter()
        .rev()
        .take_while(|e| e.len() <= MAX_EXTENSION_LENGTH)
        .filter(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_alphanumeric()))
        .take(2)
        .copied()
        .collect();
    picked.reverse();
    picked.iter().map(|e| format!(".{e}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_like_git_annex() {
        assert_eq!(extension("a.dcm"), ".dcm");
        assert_eq!(extension("study.tar.gz"), ".tar.gz");
        assert_eq!(extension("1.2.840.10008.5.dcm"), ".5.dcm");
        assert_eq!(extension("1.2.840.10008.12345.dcm"), ".dcm");
        assert_eq!(extension("x/y.7z"), ".7z");
        assert_eq!(extension("noext"), "");
        assert_eq!(extension("a.longext"), "");
        assert_eq!(md5e_key(12, "ABCDEF", "x.7z"), "MD5E-s12--abcdef.7z");
    }

    #[test]
    fn md5_from_annex_keys() {
        let md5 = "0123456789abcdef0123456789abcdef";
        assert_eq!(md5_of_md5e_key(&format!("MD5E-s123--{md5}.7z")), Some(md5));
        assert_eq!(md5_of_md5e_key("SHA256E-s1--ab.7z"), None);
        assert_eq!(md5_of_md5e_key("MD5E-s1--xyz"), None);
        assert_eq!(md5_of_md5e_key(&md5e_key(9, md5, "1.2.7z")), Some(md5), "round trip");
    }
}
