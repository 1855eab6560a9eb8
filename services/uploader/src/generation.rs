//! Which instances belong to the generation a `StudyCompleted` announces.
//!
//! The spool holds a study's directory across generations: instances of the next generation
//! (an amendment) may reach it before this generation is archived, and earlier generations'
//! files may already be gone (the lifecycle deletes what was indexed). So the uploader does not
//! take "every file in the directory": it asks study-completion's state (KV bucket
//! `bidsflux_v1_studies`), whose `instance_hashes` lists each distinct instance's fingerprint
//! in arrival order, never reordered or removed. The generation's instances are the slice
//! `[instance_count - generation_instance_count, instance_count)` of that list, with both
//! counts taken from the event, so it stays the same however much the study grew since.
//!
//! A leaf module: it knows the state's wire type and the event's counts, nothing of the handler.

use std::collections::HashSet;

use bidsflux_messaging::{Classify, ErrorClass};
use bidsflux_proto::v1 as pb;
use bidsflux_proto::v1::FailureKind;
use prost::Message as _;

/// The fingerprints (`bidsflux_session::instance_fingerprint`) of one generation's instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation(HashSet<u64>);

impl Generation {
    /// Whether the instance with this SOP Instance UID belongs to the generation.
    pub fn contains(&self, sop_instance_uid: &str) -> bool {
        self.0.contains(&bidsflux_session::instance_fingerprint(sop_instance_uid))
    }

    /// Distinct instances of the generation.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it has no instance.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The generation of `state` whose completion counted `instance_count` instances in all,
    /// `generation_instance_count` of them its own. `None` when the event has no share of its
    /// own (written before generations were counted): the caller then takes the whole spool
    /// directory, as before.
    pub fn from_state(
        state: &pb::StudyState,
        instance_count: u64,
        generation_instance_count: u64,
    ) -> Result<Option<Self>, GenerationError> {
        if generation_instance_count == 0 {
            return Ok(None);
        }
        let recorded = state.instance_hashes.len() as u64;
        if generation_instance_count > instance_count || instance_count > recorded {
            return Err(GenerationError::Inconsistent { instance_count, generation_instance_count, recorded });
        }
        let (start, end) = (instance_count - generation_instance_count, instance_count);
        let slice = state.instance_hashes.get(start as usize..end as usize).unwrap_or_default();
        Ok(Some(Self(slice.iter().copied().collect())))
    }
}

/// Why the generation's instances cannot be told.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// The KV bucket could not be read (retry).
    #[error("read the state of study {study} from {bucket}: {reason}")]
    Unavailable {
        /// StudyInstanceUID.
        study: String,
        /// The KV bucket.
        bucket: &'static str,
        /// What happened.
        reason: String,
    },
    /// The state does not decode.
    #[error("the state of study {study} does not decode: {reason}")]
    Undecodable {
        /// StudyInstanceUID.
        study: String,
        /// What prost said.
        reason: String,
    },
    /// The event counts more instances than the state ever recorded.
    #[error(
        "the completion counts {instance_count} instances ({generation_instance_count} of its generation) \
         but the study's state recorded {recorded}"
    )]
    Inconsistent {
        /// `StudyCompleted.instance_count`.
        instance_count: u64,
        /// `StudyCompleted.generation_instance_count`.
        generation_instance_count: u64,
        /// Fingerprints in the state.
        recorded: u64,
    },
}

impl Classify for GenerationError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Unavailable { .. } => ErrorClass::Transient,
            Self::Undecodable { .. } | Self::Inconsistent { .. } => ErrorClass::Permanent(FailureKind::InvalidInput),
        }
    }
}

/// The state of `study` in the KV bucket `bucket` (`None`: study-completion has none, e.g. an
/// event published by hand).
pub async fn read_state(
    kv: &async_nats::jetstream::kv::Store,
    bucket: &'static str,
    study: &str,
) -> Result<Option<pb::StudyState>, GenerationError> {
    let bytes = kv.get(study).await.map_err(|e| GenerationError::Unavailable {
        study: study.to_owned(),
        bucket,
        reason: e.to_string(),
    })?;
    bytes
        .map(|b| pb::StudyState::decode(b.as_ref()))
        .transpose()
        .map_err(|e| GenerationError::Undecodable { study: study.to_owned(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bidsflux_session::instance_fingerprint as fp;

    fn state(sops: &[&str]) -> pb::StudyState {
        pb::StudyState { instance_hashes: sops.iter().map(|s| fp(s)).collect(), ..Default::default() }
    }

    #[test]
    fn a_generation_is_its_slice_of_the_arrival_order() {
        // Generation 0: 1.1 and 1.2; the amendment: 1.3, 1.4 and 1.5 (seen by the state later).
        let s = state(&["1.1", "1.2", "1.3", "1.4", "1.5"]);
        let g0 = Generation::from_state(&s, 2, 2).unwrap().unwrap();
        assert!(g0.contains("1.1") && g0.contains("1.2") && !g0.contains("1.3"));
        assert_eq!(g0.len(), 2);
        let g1 = Generation::from_state(&s, 5, 3).unwrap().unwrap();
        assert!(!g1.contains("1.2") && g1.contains("1.3") && g1.contains("1.5"));
        assert_eq!(g1.len(), 3);
    }

    #[test]
    fn old_events_take_the_whole_directory_and_impossible_counts_are_refused() {
        let s = state(&["1.1", "1.2"]);
        assert_eq!(Generation::from_state(&s, 2, 0).unwrap(), None);
        let e = Generation::from_state(&s, 3, 1).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Permanent(FailureKind::InvalidInput));
        assert!(e.to_string().contains("recorded 2"), "{e}");
        assert!(Generation::from_state(&s, 1, 2).is_err());
    }
}
