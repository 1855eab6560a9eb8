//! The `StudyCompleted` event as the uploader uses it, validated at the edge.

use bidsflux_proto::v1 as pb;
use bidsflux_session::{Uid, UidError};

/// A completed study (or amendment) to archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// StudyInstanceUID, safe to use as a path component.
    pub study: Uid,
    /// 0 for the study, 1.. for amendments.
    pub generation: u32,
    /// Instances the completion announced; the spool must hold at least as many.
    pub instance_count: u64,
    /// This generation's share of `instance_count` (what an amendment finds in
    /// the spool once the earlier generations were indexed and deleted).
    pub generation_instance_count: u64,
    /// Why the study was declared complete (copied to `ArchiveStored`).
    pub reason: Option<pb::CompletionReason>,
    /// 0, or the count of an operator's re-index of this generation.
    pub reindex: u32,
}

/// A `StudyCompleted` that breaks the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompletionError {
    /// The study UID is not a UID.
    #[error("StudyCompleted: {0}")]
    Uid(#[from] UidError),
    /// `spool_study_dir` is not the study UID (the spool layout is fixed).
    #[error(
        "StudyCompleted: spool_study_dir is not the StudyInstanceUID (spool layout <spool>/<StudyInstanceUID>/...)"
    )]
    SpoolDir,
}

impl TryFrom<&pb::StudyCompleted> for Completion {
    type Error = CompletionError;

    fn try_from(m: &pb::StudyCompleted) -> Result<Self, CompletionError> {
        let study = Uid::parse("StudyInstanceUID", &m.study_instance_uid)?;
        let dir = m.spool_study_dir.trim_end_matches('/');
        if !dir.is_empty() && dir != study.as_str() {
            return Err(CompletionError::SpoolDir);
        }
        Ok(Self {
            study,
            generation: m.generation,
            instance_count: m.instance_count,
            generation_instance_count: m.generation_instance_count,
            reason: m.reason.clone(),
            reindex: m.reindex,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_uid_and_spool_dir() {
        let mut m = pb::StudyCompleted {
            study_instance_uid: "1.2.3".into(),
            generation: 2,
            instance_count: 10,
            spool_study_dir: "1.2.3".into(),
            ..Default::default()
        };
        let c = Completion::try_from(&m).unwrap();
        assert_eq!((c.study.as_str(), c.generation, c.instance_count), ("1.2.3", 2, 10));
        m.spool_study_dir = "../etc".into();
        assert_eq!(Completion::try_from(&m), Err(CompletionError::SpoolDir));
        m.study_instance_uid = "../1".into();
        assert!(matches!(Completion::try_from(&m), Err(CompletionError::Uid(_))));
    }
}
