//! Names on the bus, defined once. Versions are part of every name.
//!
//! | event | subject | stream | consumers |
//! |---|---|---|---|
//! | InstanceStored | `bidsflux.v1.instance.stored` | `BIDSFLUX_V1_INSTANCES` | `study-completion` |
//! | StudyCompleted | `bidsflux.v1.study.completed` | `BIDSFLUX_V1_STUDIES` | `uploader` |
//! | StudyDiscarded | `bidsflux.v1.study.discarded` | `BIDSFLUX_V1_STUDIES` | `uploader-lifecycle` (spool lifecycle) |
//! | StudyHeld | `bidsflux.v1.study.held` | `BIDSFLUX_V1_STUDIES` | — (operators) |
//! | ArchiveStored | `bidsflux.v1.archive.stored` | `BIDSFLUX_V1_ARCHIVES` | `indexer` (work queue shared by replicas) |
//! | StudyIndexed | `bidsflux.v1.study.indexed` | `BIDSFLUX_V1_INDEXED` | `uploader-lifecycle` (spool lifecycle) |
//! | InstanceConflict | `bidsflux.v1.instance.conflict` | `BIDSFLUX_V1_CONFLICTS` | — (operators) |
//! | DeadLetter | `bidsflux.v1.deadletter.<service>` | `BIDSFLUX_V1_DEADLETTER` | — (operators) |

/// Prefix of every subject.
pub const PREFIX: &str = "bidsflux.v1";

/// An instance is durably in the spool.
pub const INSTANCE_STORED: &str = "bidsflux.v1.instance.stored";
/// A different data set with an already spooled SOP Instance UID arrived; both are kept.
pub const INSTANCE_CONFLICT: &str = "bidsflux.v1.instance.conflict";
/// A study (or amendment) is complete.
pub const STUDY_COMPLETED: &str = "bidsflux.v1.study.completed";
/// A study generation was discarded by its rule or an operator (no `StudyCompleted` for it).
pub const STUDY_DISCARDED: &str = "bidsflux.v1.study.discarded";
/// A study waits for an operator.
pub const STUDY_HELD: &str = "bidsflux.v1.study.held";
/// A study archive is stored and verified in S3.
pub const ARCHIVE_STORED: &str = "bidsflux.v1.archive.stored";
/// A study is indexed in the forge.
pub const STUDY_INDEXED: &str = "bidsflux.v1.study.indexed";
/// Prefix of dead-letter subjects (`<prefix>.<service>`).
pub const DEADLETTER_PREFIX: &str = "bidsflux.v1.deadletter";

/// The dead-letter subject of a service.
pub fn deadletter(service: &str) -> String {
    format!("{DEADLETTER_PREFIX}.{service}")
}

/// Stream of `InstanceStored`.
pub const STREAM_INSTANCES: &str = "BIDSFLUX_V1_INSTANCES";
/// Stream of `InstanceConflict` (kept without age limit, for operators).
pub const STREAM_CONFLICTS: &str = "BIDSFLUX_V1_CONFLICTS";
/// Stream of `StudyCompleted`, `StudyDiscarded` and `StudyHeld` (one subject each).
pub const STREAM_STUDIES: &str = "BIDSFLUX_V1_STUDIES";
/// Stream of `ArchiveStored`.
pub const STREAM_ARCHIVES: &str = "BIDSFLUX_V1_ARCHIVES";
/// Stream of `StudyIndexed`.
pub const STREAM_INDEXED: &str = "BIDSFLUX_V1_INDEXED";
/// Stream of `DeadLetter`.
pub const STREAM_DEADLETTER: &str = "BIDSFLUX_V1_DEADLETTER";

/// Durable consumer of the study-completion service on [`STREAM_INSTANCES`].
pub const CONSUMER_STUDY_COMPLETION: &str = "study-completion";
/// Durable consumer of the uploader on [`STREAM_STUDIES`].
pub const CONSUMER_UPLOADER: &str = "uploader";
/// Durable consumer of the uploader's spool lifecycle, on [`STREAM_INDEXED`]
/// (`StudyIndexed`) and on [`STREAM_STUDIES`] (`StudyDiscarded`): one name, one consumer per stream.
pub const CONSUMER_UPLOADER_LIFECYCLE: &str = "uploader-lifecycle";
/// Durable consumer shared by all indexer replicas on [`STREAM_ARCHIVES`].
pub const CONSUMER_INDEXER: &str = "indexer";

/// KV bucket holding the study-completion state (`StudyState`, key = StudyInstanceUID).
pub const KV_STUDIES: &str = "bidsflux_v1_studies";

/// Object store bucket holding manifests too large for an `ArchiveStored` message.
pub const OBJ_MANIFESTS: &str = "bidsflux_v1_manifests";

/// The de-duplication id of an `InstanceStored` event (`Nats-Msg-Id`).
pub fn instance_msg_id(sop_instance_uid: &str, dataset_sha256: &str) -> String {
    format!("instance:{sop_instance_uid}:{dataset_sha256}")
}

/// The de-duplication id of an `InstanceConflict` event (the newcomer's data set hash: the same
/// conflicting data set sent again is one conflict).
pub fn conflict_msg_id(sop_instance_uid: &str, conflict_dataset_sha256: &str) -> String {
    format!("conflict:{sop_instance_uid}:{conflict_dataset_sha256}")
}

/// The de-duplication id of a `StudyCompleted` event.
pub fn completed_msg_id(study_instance_uid: &str, generation: u32) -> String {
    format!("completed:{study_instance_uid}:{generation}")
}

/// The de-duplication id of an operator's re-publication (`n` = 1, 2, …) of the `StudyCompleted` of
/// `generation`: a new id, so JetStream delivers it again within the duplicate window.
pub fn reindex_msg_id(study_instance_uid: &str, generation: u32, n: u32) -> String {
    format!("completed:{study_instance_uid}:{generation}:reindex:{n}")
}

/// The de-duplication id of a `StudyDiscarded` event (a generation is discarded once).
pub fn discarded_msg_id(study_instance_uid: &str, generation: u32) -> String {
    format!("discarded:{study_instance_uid}:{generation}")
}

/// The de-duplication id of the `n`-th `StudyHeld` event of a study (a study can be held,
/// released and held again).
pub fn held_msg_id(study_instance_uid: &str, generation: u32, n: u32) -> String {
    format!("held:{study_instance_uid}:{generation}:{n}")
}

/// The de-duplication id of an `ArchiveStored` event (same archive bytes, same id); the `n`-th
/// re-index of a generation (`StudyCompleted.reindex`) gets its own.
pub fn archive_msg_id(study_instance_uid: &str, generation: u32, archive_md5: &str, reindex: u32) -> String {
    match reindex {
        0 => format!("archive:{study_instance_uid}:{generation}:{archive_md5}"),
        n => format!("archive:{study_instance_uid}:{generation}:{archive_md5}:reindex:{n}"),
    }
}

/// The de-duplication id of a `StudyIndexed` event.
pub fn indexed_msg_id(study_instance_uid: &str, generation: u32) -> String {
    format!("indexed:{study_instance_uid}:{generation}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_versioned() {
        for s in [
            INSTANCE_STORED,
            INSTANCE_CONFLICT,
            STUDY_COMPLETED,
            STUDY_DISCARDED,
            STUDY_HELD,
            ARCHIVE_STORED,
            STUDY_INDEXED,
            DEADLETTER_PREFIX,
        ] {
            assert!(s.starts_with("bidsflux.v1."), "{s}");
        }
        assert_eq!(deadletter("uploader"), "bidsflux.v1.deadletter.uploader");
        for s in
            [STREAM_INSTANCES, STREAM_CONFLICTS, STREAM_STUDIES, STREAM_ARCHIVES, STREAM_INDEXED, STREAM_DEADLETTER]
        {
            assert!(s.starts_with("BIDSFLUX_V1_"), "{s}");
        }
        assert_eq!(conflict_msg_id("1.2", "ab"), "conflict:1.2:ab");
        assert_eq!(reindex_msg_id("1.2", 1, 3), "completed:1.2:1:reindex:3");
        assert_eq!(discarded_msg_id("1.2", 0), "discarded:1.2:0");
        assert_eq!(held_msg_id("1.2", 0, 2), "held:1.2:0:2");
        assert!(KV_STUDIES.starts_with("bidsflux_v1_"));
        assert!(OBJ_MANIFESTS.starts_with("bidsflux_v1_"));
    }
}
