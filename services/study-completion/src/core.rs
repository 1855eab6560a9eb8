//! What every writer of study state shares: the bus, the bucket, the state machine, the metrics,
//! and what happens after a successful write (metrics, log, outbox, next check).

use std::sync::Arc;

use async_nats::jetstream::kv;
use bidsflux_messaging::Bus;
use bidsflux_proto::v1 as pb;

use crate::decide::{Decision, Engine, Outcome, criterion_label};
use crate::metrics::Metrics;
use crate::outbox;

/// Shared by the consumer, the timers and the admin API.
#[derive(Debug, Clone)]
pub struct Core {
    /// To publish the outbox.
    pub bus: Bus,
    /// The `bidsflux_v1_studies` bucket.
    pub kv: kv::Store,
    /// The rules and the state machine.
    pub engine: Engine,
    /// Counted here, rendered by `/metrics`.
    pub metrics: Arc<Metrics>,
}

impl Core {
    /// Records a write that changed `before` into `written` with `decision`: metrics and the log
    /// line of the decision (UIDs and rule names only).
    pub fn record(&self, before: Option<&pb::StudyState>, written: &pb::StudyState, decision: Option<&Decision>) {
        if before.map(|b| b.status) != Some(written.status) {
            self.metrics.status_changed(before.map(|b| b.status), written.status);
        }
        let Some(d) = decision else { return };
        self.metrics.decision(d);
        let (study, rule) = (written.study_instance_uid.as_str(), written.rule.as_str());
        let criterion = criterion_label(d.criterion);
        match d.outcome {
            Outcome::Indexed => {
                tracing::info!(study_uid = %study, generation = d.generation, rule, criterion, detail = %d.detail, "study completed")
            }
            Outcome::Discarded => {
                tracing::info!(study_uid = %study, generation = d.generation, rule, criterion, detail = %d.detail, "study discarded")
            }
            Outcome::Held => {
                tracing::warn!(study_uid = %study, generation = d.generation, rule, criterion, detail = %d.detail, "study held for an operator")
            }
        }
    }

    /// After a write of `written`: publishes its outbox, if any, and says when to look at the
    /// study again (its deadline while OPEN). An error means the outbox is still to publish.
    pub async fn settle(&self, written: &pb::StudyState) -> anyhow::Result<Option<i64>> {
        if !written.outbox.is_empty() {
            outbox::flush(&self.bus, &self.kv, &written.study_instance_uid).await?;
        }
        Ok(next_check(written))
    }
}

/// When an OPEN study with a deadline must be evaluated again.
pub fn next_check(s: &pb::StudyState) -> Option<i64> {
    (s.status == pb::StudyStatus::Open as i32 && s.deadline_unix_ms > 0).then_some(s.deadline_unix_ms)
}
