//! The study-completion service.
//!
//! Consumes *instance stored*, keeps per-study state in the JetStream KV bucket
//! `bidsflux_v1_studies`, and decides by the completion rules (`docs/completion-rules.md`) when
//! a study is complete and what then: *study completed* for the pipeline, *study discarded*, or
//! a hold for an operator. The rule is selected on a study's first instance and evaluated after
//! every instance and at the verdict's re-check time, a durable deadline in the state, so a
//! restart resumes where it stopped.
//!
//! Exactly one completion per study generation: a transition and its event are written together
//! with compare-and-set (the event in the state's outbox, [`decide`]), then published with a
//! de-duplication id (`completed:<uid>:<generation>`) and removed from the outbox (`outbox`).

mod admin;
mod config;
mod core;
pub mod decide;
mod metrics;
mod outbox;
pub mod rules;
pub mod state;
mod study_kv;
mod timers;

#[cfg(test)]
mod sim_tests;

use std::sync::Arc;

use anyhow::Context as _;
use bidsflux_messaging::topology::Requirement;
use bidsflux_messaging::{Bus, ConsumerOptions, Delivery, HandlerError, now_unix_ms, run_consumer, subjects, trace};
use bidsflux_proto::v1 as pb;
use bidsflux_service::tasks::SHUTDOWN_GRACE;
use bidsflux_service::{Tasks, listen};
use bidsflux_session::Uid;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, DEFAULT_GRPC_BIND, DEFAULT_HTTP_BIND, GRPC_BIND_VAR, HTTP_BIND_VAR, RULES_VAR};

use crate::core::{Core, next_check};
use crate::decide::Engine;
use crate::metrics::Metrics;
use crate::state::Applied;
use crate::study_kv::StoreError;
use crate::timers::Timers;

/// JetStream objects this service needs.
pub const REQUIRES: &[Requirement] = &[
    Requirement::Consumer { stream: subjects::STREAM_INSTANCES, name: subjects::CONSUMER_STUDY_COMPLETION },
    Requirement::Stream(subjects::STREAM_STUDIES),
    Requirement::KeyValue(subjects::KV_STUDIES),
    Requirement::Stream(subjects::STREAM_DEADLETTER),
];

/// The listeners of the service, bound before it starts (tests bind `127.0.0.1:0`).
#[derive(Debug, Default)]
pub struct Listeners {
    /// `GET /metrics` and `GET /healthz`.
    pub http: Option<TcpListener>,
    /// The gRPC admin API and gRPC health.
    pub grpc: Option<TcpListener>,
}

impl Listeners {
    /// Binds what `config` asks for.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let http = listen::bind_optional(config.http_bind, HTTP_BIND_VAR).await?;
        let grpc = listen::bind_optional(config.grpc_bind, GRPC_BIND_VAR).await?;
        Ok(Self { http, grpc })
    }
}

/// Runs the service until `shutdown` is cancelled, with the listeners `config` asks for.
pub async fn run(config: Config, bus: Bus, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config).await?;
    serve(config, bus, listeners, shutdown).await
}

/// Runs the service until `shutdown` is cancelled on the given listeners.
pub async fn serve(config: Config, bus: Bus, listeners: Listeners, shutdown: CancellationToken) -> anyhow::Result<()> {
    let kv = bus.js.get_key_value(subjects::KV_STUDIES).await.context("open the studies KV bucket")?;
    let rules = config.rules.clone();
    let core = Core { bus: bus.clone(), kv, engine: Engine::new(rules.clone()), metrics: Arc::new(Metrics::default()) };
    let tasks = Tasks::new(&shutdown);
    let timers = Timers::start(core.clone(), &tasks);
    let resumed = resume(&core, &timers).await.context("resume open studies")?;
    let names: Vec<&str> = rules.rules().iter().map(|r| r.name()).collect();
    let keywords: Vec<&str> = rules.attribute_keywords().into_iter().chain(rules.completion_keywords()).collect();
    tracing::info!(
        resumed,
        rules = ?names,
        fallback = rules.fallback().map_or("hold", |r| r.name()),
        rules_file = %config.rules_path.as_ref().map_or("(built in)".to_owned(), |p| p.display().to_string()),
        keywords = ?keywords,
        "study-completion started"
    );

    bidsflux_service::http::spawn(&tasks, listeners.http, Arc::new(bus.clone()), core.metrics.clone());
    if let Some(listener) = listeners.grpc {
        let (serving, abort) =
            (admin::serve(core.clone(), timers.clone(), listener, tasks.shutdown().clone()), tasks.abort_token());
        // Calls in progress finish within the grace period, or are cut off.
        tasks.spawn("admin API", async move {
            tokio::select! {
                served = serving => served,
                _ = abort.cancelled() => Ok(()),
            }
        });
    }

    let mut opts = ConsumerOptions::new(subjects::STREAM_INSTANCES, subjects::CONSUMER_STUDY_COMPLETION);
    opts.concurrency = 8;
    let consumed = run_consumer(bus, opts, shutdown, study_of, move |d: Delivery| {
        let core = core.clone();
        let timers = timers.clone();
        async move { on_instance(&core, &timers, d).await }
    })
    .await;
    tasks.stop(SHUTDOWN_GRACE).await;
    consumed
}

fn study_of(d: &Delivery) -> Option<String> {
    pb::InstanceStored::decode(d.payload.as_ref()).ok().map(|e| e.study_instance_uid)
}

/// Schedules every study with a deadline or an unpublished event, and counts the held ones.
async fn resume(core: &Core, timers: &Timers) -> anyhow::Result<usize> {
    let now = now_unix_ms();
    let mut resumed = 0;
    let mut held = 0;
    for s in study_kv::scan(&core.kv).await? {
        if s.status == pb::StudyStatus::Held as i32 {
            held += 1;
        }
        let at = if s.outbox.is_empty() { next_check(&s) } else { Some(now) };
        if let Some(at) = at {
            timers.schedule(s.study_instance_uid.clone(), at);
            resumed += 1;
        }
    }
    core.metrics.set_held(held);
    Ok(resumed)
}

#[tracing::instrument(skip_all, fields(study_uid, sop_uid))]
async fn on_instance(core: &Core, timers: &Timers, d: Delivery) -> Result<(), HandlerError> {
    let ev: pb::InstanceStored = d.decode()?;
    let study =
        Uid::parse("StudyInstanceUID", &ev.study_instance_uid).map_err(|e| HandlerError::malformed(e.to_string()))?;
    Uid::parse("SOPInstanceUID", &ev.sop_instance_uid).map_err(|e| HandlerError::malformed(e.to_string()))?;
    let span = tracing::Span::current();
    span.record("study_uid", study.as_str());
    span.record("sop_uid", ev.sop_instance_uid.as_str());
    let traceparent = trace::current_traceparent();
    let now = now_unix_ms();
    let updated = study_kv::update(&core.kv, study.as_str(), |s| -> Result<_, StoreError> {
        let (next, applied, decision) = core.engine.apply_instance(s, &ev, now, traceparent.clone());
        let write = (applied != Applied::Duplicate).then_some(next);
        Ok((write, (applied, decision)))
    })
    .await?;
    let (applied, decision) = updated.value;
    core.metrics.instance(applied);
    let Some(written) = updated.written else {
        tracing::debug!("duplicate instance event ignored");
        return Ok(());
    };
    match applied {
        Applied::NewStudy => tracing::info!(rule = %written.rule, "new study"),
        Applied::Amendment => tracing::info!(generation = written.generation, "late instance opened an amendment"),
        Applied::Added | Applied::Duplicate => {}
    }
    core.record(updated.before.as_ref(), &written, decision.as_ref());
    match core.settle(&written).await {
        Ok(Some(at)) => timers.schedule(study.as_str().to_owned(), at),
        Ok(None) => {}
        Err(e) => {
            // Recorded with the state: the timer publishes it.
            tracing::warn!(error = %format!("{e:#}"), "publishing the study's event failed, will retry");
            timers.schedule(study.as_str().to_owned(), now_unix_ms() + 1000);
        }
    }
    Ok(())
}
