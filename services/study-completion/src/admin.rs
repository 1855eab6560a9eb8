//! The admin API (`bidsflux.v1.StudyAdmin`, gRPC) and gRPC health.
//!
//! Every command is a pure transition ([`crate::decide::Engine::operate`]) applied with
//! compare-and-set like an instance, so it races safely with the consumer and the timers; its
//! event goes through the outbox. Patient values leave the service only through `GetStudy` with
//! `include_patient_values`, and never reach logs.

use std::net::SocketAddr;

use bidsflux_messaging::now_unix_ms;
use bidsflux_proto::v1 as pb;
use bidsflux_proto::v1::study_admin_server::{StudyAdmin, StudyAdminServer};
use bidsflux_session::Uid;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::core::{Core, next_check};
use crate::decide::{Command, Refused};
use crate::study_kv::{self, StoreError};
use crate::timers::Timers;

/// `ListStudies` answers at most this many when the request sets no limit.
const DEFAULT_LIST_LIMIT: usize = 1000;

/// The admin service.
#[derive(Debug, Clone)]
pub struct Admin {
    core: Core,
    timers: Timers,
}

/// Why a command did not apply.
enum Failure {
    Refused(Refused),
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Refused(r @ Refused::NotFound) => Status::not_found(r.to_string()),
            Failure::Refused(r) => Status::failed_precondition(r.to_string()),
            Failure::Store(e) => Status::unavailable(format!("study state: {e}")),
        }
    }
}

fn parse_uid(uid: &str) -> Result<Uid, Status> {
    Uid::parse("StudyInstanceUID", uid).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A study as listed (no patient values).
pub fn summary(s: &pb::StudyState) -> pb::StudySummary {
    pb::StudySummary {
        study_instance_uid: s.study_instance_uid.clone(),
        status: s.status,
        generation: s.generation,
        rule: s.rule.clone(),
        hold_cause: s.hold_cause,
        instance_count: s.instance_hashes.len() as u64,
        series_count: u32::try_from(s.series_instance_uids.len()).unwrap_or(u32::MAX),
        generation_instance_count: s.generation_instances,
        generation_series_count: u32::try_from(s.series.len()).unwrap_or(u32::MAX),
        created_at_unix_ms: s.created_at_unix_ms,
        first_instance_unix_ms: s.first_instance_unix_ms,
        last_instance_unix_ms: s.last_instance_unix_ms,
        deadline_unix_ms: if s.status == pb::StudyStatus::Open as i32 { s.deadline_unix_ms } else { 0 },
        completed_at_unix_ms: s.completed_at_unix_ms,
        status_changed_at_unix_ms: s.status_changed_at_unix_ms,
        last_reason: s.last_reason.clone(),
        unpublished_events: u32::try_from(s.outbox.len()).unwrap_or(u32::MAX),
    }
}

/// A study in detail; `attributes` only when `patient_values`.
pub fn detail(s: &pb::StudyState, patient_values: bool) -> pb::StudyDetail {
    pb::StudyDetail {
        summary: Some(summary(s)),
        series: s
            .series
            .iter()
            .map(|x| pb::SeriesSummary {
                series_instance_uid: x.series_instance_uid.clone(),
                description: x.description.clone(),
                modality: x.modality.clone(),
                series_number: x.series_number.clone(),
                instances: x.instances,
                expected_instances: x.expected_instances,
                first_instance_unix_ms: x.first_instance_unix_ms,
                last_instance_unix_ms: x.last_instance_unix_ms,
            })
            .collect(),
        expected_series: s.expected_series,
        expected_instances: s.expected_instances,
        last_completed: s.last_completed.clone(),
        reindex_count: s.reindex_count,
        attributes: if patient_values { s.attributes.clone() } else { Default::default() },
    }
}

impl Admin {
    /// Applies an operator's command to `uid` and publishes what it decided.
    async fn command(&self, uid: &str, command: Command) -> Result<Response<pb::StudyDetail>, Status> {
        let study = parse_uid(uid)?;
        let core = &self.core;
        let now = now_unix_ms();
        let updated = study_kv::update(&core.kv, study.as_str(), |s| -> Result<_, Failure> {
            let (next, decision) = core.engine.operate(s.clone(), command, now).map_err(Failure::Refused)?;
            let changed = s.as_ref() != Some(&next);
            Ok((changed.then(|| next.clone()), (next, decision)))
        })
        .await
        .map_err(|f| {
            let status = Status::from(f);
            tracing::info!(study_uid = %study.as_str(), command = command.as_str(), refused = %status.message(), "operator command refused");
            status
        })?;
        let (state, decision) = updated.value;
        tracing::info!(study_uid = %study.as_str(), command = command.as_str(), changed = updated.written.is_some(), "operator command");
        if let Some(written) = &updated.written {
            core.record(updated.before.as_ref(), written, decision.as_ref());
            match core.settle(written).await {
                Ok(Some(at)) => self.timers.schedule(study.as_str().to_owned(), at),
                Ok(None) => {}
                Err(e) => {
                    // Recorded with the state: the timer publishes it.
                    tracing::warn!(study_uid = %study.as_str(), error = %format!("{e:#}"), "publishing the study's event failed, will retry");
                    self.timers.schedule(study.as_str().to_owned(), now_unix_ms() + 1000);
                }
            }
        }
        // Re-read so the answer shows the outbox as published (or not).
        let shown = match study_kv::read(&core.kv, study.as_str()).await {
            Ok(study_kv::Current { state: Some(s), .. }) => s,
            _ => state,
        };
        if let Some(at) = next_check(&shown) {
            self.timers.schedule(study.as_str().to_owned(), at);
        }
        Ok(Response::new(detail(&shown, false)))
    }
}

#[tonic::async_trait]
impl StudyAdmin for Admin {
    async fn list_studies(
        &self,
        request: Request<pb::ListStudiesRequest>,
    ) -> Result<Response<pb::ListStudiesResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 { DEFAULT_LIST_LIMIT } else { req.limit as usize };
        let all = study_kv::scan(&self.core.kv).await.map_err(|e| Status::unavailable(format!("{e:#}")))?;
        let mut studies: Vec<pb::StudySummary> =
            all.iter().filter(|s| req.statuses.is_empty() || req.statuses.contains(&s.status)).map(summary).collect();
        studies.sort_by_key(|s| std::cmp::Reverse(s.created_at_unix_ms));
        let truncated = studies.len() > limit;
        studies.truncate(limit);
        Ok(Response::new(pb::ListStudiesResponse { studies, truncated }))
    }

    async fn get_study(&self, request: Request<pb::GetStudyRequest>) -> Result<Response<pb::StudyDetail>, Status> {
        let req = request.into_inner();
        let study = parse_uid(&req.study_instance_uid)?;
        let current =
            study_kv::read(&self.core.kv, study.as_str()).await.map_err(|e| Status::unavailable(format!("{e:#}")))?;
        let s = current.state.ok_or_else(|| Status::not_found(Refused::NotFound.to_string()))?;
        if req.include_patient_values {
            tracing::info!(study_uid = %study.as_str(), "study attributes shown to an operator");
        }
        Ok(Response::new(detail(&s, req.include_patient_values)))
    }

    async fn force_complete(&self, r: Request<pb::StudyRequest>) -> Result<Response<pb::StudyDetail>, Status> {
        self.command(&r.into_inner().study_instance_uid, Command::ForceComplete).await
    }

    async fn hold(&self, r: Request<pb::StudyRequest>) -> Result<Response<pb::StudyDetail>, Status> {
        self.command(&r.into_inner().study_instance_uid, Command::Hold).await
    }

    async fn release(&self, r: Request<pb::StudyRequest>) -> Result<Response<pb::StudyDetail>, Status> {
        self.command(&r.into_inner().study_instance_uid, Command::Release).await
    }

    async fn discard(&self, r: Request<pb::StudyRequest>) -> Result<Response<pb::StudyDetail>, Status> {
        self.command(&r.into_inner().study_instance_uid, Command::Discard).await
    }

    async fn reindex(&self, r: Request<pb::StudyRequest>) -> Result<Response<pb::StudyDetail>, Status> {
        self.command(&r.into_inner().study_instance_uid, Command::Reindex).await
    }
}

/// Serves the admin API and gRPC health on `listener` until `shutdown` is cancelled.
pub async fn serve(
    core: Core,
    timers: Timers,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<StudyAdminServer<Admin>>().await;
    tracing::info!(addr = ?addr, "serving the admin API (gRPC)");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(StudyAdminServer::new(Admin { core, timers }))
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown.cancelled_owned())
        .await
        .map_err(|e| anyhow::anyhow!("admin API: {e}"))
}
