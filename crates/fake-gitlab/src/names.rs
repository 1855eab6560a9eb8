//! GitLab's rules for the paths and names of users, groups and projects.

/// What GitLab says when a path breaks [`valid_path`].
pub(crate) const PATH_RULE: &str =
    "can contain only letters, digits, '_', '-' and '.'; cannot start with '-' or end in '.', '.git' or '.atom'";

/// Top-level paths GitLab keeps for its own routes.
pub(crate) const RESERVED_TOP_LEVEL: [&str; 12] =
    ["-", "admin", "api", "assets", "dashboard", "explore", "groups", "help", "projects", "public", "uploads", "users"];

/// A valid path (last component of a namespace or project).
pub(crate) fn valid_path(path: &str) -> bool {
    let ok_chars = path.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    ok_chars
        && !path.is_empty()
        && path.len() <= 255
        && !path.starts_with('-')
        && !path.ends_with('.')
        && !path.ends_with(".git")
        && !path.ends_with(".atom")
}

/// A valid display name of a group or project.
pub(crate) fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphanumeric() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | ' ' | '(' | ')' | '+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert!(valid_path("sub-01_x.y"));
        assert!(!valid_path("-x"));
        assert!(!valid_path("x.git"));
        assert!(!valid_path("a/b"));
        assert!(!valid_path("a b"));
    }
}
