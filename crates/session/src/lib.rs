//! Domain types of one scanning session, shared by every service.
//!
//! - [`uid`]: DICOM UID validation, done before a UID touches a path.
//! - [`metas`]: the session metas read from the first DICOM of a study.
//! - [`template`]: the safe renderer of `S3_URL_PATTERN` and
//!   `GITLAB_INDEXER_GROUP_TEMPLATE` (no eval; values cannot escape their segment).
//! - [`s3`]: bucket naming and key placement of study archives.
//! - [`annex`]: git-annex keys, computed the way git-annex computes them.

pub mod annex;
pub mod metas;
pub mod s3;
pub mod template;
pub mod uid;

pub use metas::SessionMetas;
pub use template::{RenderError, Template, TemplateError};
pub use uid::{Uid, UidError};
