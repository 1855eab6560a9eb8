//! One way to set up logs and traces for every service.
//!
//! [`init_telemetry`] installs a `tracing` subscriber that prints logs
//! (`RUST_LOG`, default `info`; `BIDSFLUX_LOG_FORMAT=json` for JSON lines) and
//! feeds spans to OpenTelemetry. Spans are exported with OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set and
//! `OTEL_SDK_DISABLED` is not `true`; otherwise trace ids are still generated
//! and propagated over NATS, just not exported. The W3C trace-context
//! propagator is installed globally for `bidsflux-messaging`.
//!
//! Spans carry UIDs, sizes and AE titles, never patient values.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes and shuts the tracer provider down when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

fn exporting() -> bool {
    let set = |k: &str| std::env::var(k).map(|v| !v.trim().is_empty()).unwrap_or(false);
    let disabled = std::env::var("OTEL_SDK_DISABLED").map(|v| v.eq_ignore_ascii_case("true")).unwrap_or(false);
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn provider(service: &str, export: bool) -> anyhow::Result<SdkTracerProvider> {
    let service_name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let resource = Resource::builder().with_service_name(service_name).build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if export {
        use opentelemetry_otlp::WithExportConfig as _;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if let Ok(endpoint) = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            exporter = exporter.with_endpoint(endpoint);
        }
        builder = builder.with_batch_exporter(exporter.build()?);
    }
    Ok(builder.build())
}

/// Sets up logging and tracing for `service` (e.g. `bidsflux-receiver`).
///
/// Call once at the start of `main`; keep the guard alive until exit.
pub fn init_telemetry(service: &str) -> anyhow::Result<TelemetryGuard> {
    init(service, false)
}

/// [`init_telemetry`] with the logs on standard error (a command whose standard output is its
/// result, e.g. the provisioner's plan) or standard output (a service).
fn init(service: &str, to_stderr: bool) -> anyhow::Result<TelemetryGuard> {
    let export = exporting();
    let provider = provider(service, export)?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("bidsflux"));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("BIDSFLUX_LOG_FORMAT").map(|v| v == "json").unwrap_or(false);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let writer = tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || -> Box<dyn std::io::Write> {
        if to_stderr { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) }
    });
    if json {
        registry.with(tracing_subscriber::fmt::layer().json().with_target(true).with_writer(writer)).try_init()?;
    } else {
        let ansi = if to_stderr {
            std::io::IsTerminal::is_terminal(&std::io::stderr())
        } else {
            std::io::IsTerminal::is_terminal(&std::io::stdout())
        };
        registry
            .with(tracing_subscriber::fmt::layer().with_target(true).with_ansi(ansi).with_writer(writer))
            .try_init()?;
    }
    tracing::info!(service, otlp_export = export, "telemetry initialised");
    Ok(TelemetryGuard { provider: Some(provider) })
}

/// Telemetry for tests: installed once per process (several tests share it),
/// spans are traced (so trace context propagates) but never exported, and
/// logs go to the test writer.
pub fn init_for_tests() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(provider) = provider("bidsflux-test", false) else { return };
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
        let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("bidsflux-test"));
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(otel)
            .with(tracing_subscriber::fmt::layer().with_test_writer())
            .try_init();
        // The provider lives for the whole test process.
        std::mem::forget(provider);
    });
}

/// The body of every service `main`: sets up telemetry for `service`, runs
/// `start` (configuration, connections, the service itself) and turns its
/// result into the exit code, logging a failure once, through telemetry.
pub async fn service_main<F, Fut>(service: &str, start: F) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    main_with(service, false, || async move { start().await.map(|()| std::process::ExitCode::SUCCESS) }).await
}

/// [`service_main`] for a command: its logs go to standard error (standard output is its
/// result) and its success may have more than one exit code (a dry run that found changes
/// exits 2).
pub async fn command_main<F, Fut>(service: &str, start: F) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<std::process::ExitCode>>,
{
    main_with(service, true, start).await
}

async fn main_with<F, Fut>(service: &str, to_stderr: bool, start: F) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<std::process::ExitCode>>,
{
    let _telemetry = match init(service, to_stderr) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cannot initialise telemetry: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match start().await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(service, error = %format!("{e:#}"), "service stopped with an error");
            std::process::ExitCode::FAILURE
        }
    }
}
