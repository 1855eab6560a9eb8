//! One association: negotiation (access policy, SOP classes, transfer
//! syntaxes, TLS), then the DIMSE loop (C-ECHO, C-STORE) until release, abort,
//! a protocol error, or the end of the shutdown grace period.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_ul::Pdu;
use dicom_ul::association::server::DefaultNegotiation;
use dicom_ul::association::{Association as _, AsyncServerAssociation, Error as UlError, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, PDataValue, PDataValueType, PresentationContextNegotiated, PresentationContextResultReason,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::Config;
use crate::access::{Gate, Policy};
use crate::conformance;
use crate::cstore::{IncomingStore, StoreContext, StoreRequest};
use crate::dimse::{self, Command, Response};
use crate::metrics::{Metrics, RejectReason};

/// Negotiation options of the service (the gate is set per connection: it needs the peer's address).
pub type Options = ServerAssociationOptions<'static, Gate, DefaultNegotiation>;

/// What every connection shares to negotiate: options, access policy, TLS.
#[derive(Debug)]
pub struct Acceptor {
    /// Options with a placeholder gate; [`Acceptor::options_for`] puts the peer's in.
    options: Options,
    /// The access policy every gate consults.
    policy: Arc<Policy>,
    /// TLS configuration, when the listener speaks TLS.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Bound on negotiation (TLS handshake included) and on answering a rejected connection.
    timeout: Duration,
    /// `BIDSFLUX_MAX_ASSOCIATIONS`, for the log of a rejection.
    max_associations: usize,
}

impl Acceptor {
    /// Builds the negotiation options from the configuration.
    pub fn new(config: &Config) -> Self {
        let policy = Arc::new(config.access.clone());
        let mut options = ServerAssociationOptions::new()
            .ae_access_control(Gate::new(policy.clone(), IpAddr::from([0, 0, 0, 0])))
            .ae_title(config.ae_title.clone())
            .max_pdu_length(config.max_pdu)
            .read_timeout(config.dicom_timeout)
            .write_timeout(config.dicom_timeout);
        for uid in conformance::abstract_syntaxes() {
            options = options.with_abstract_syntax(uid);
        }
        for (uid, _) in conformance::TRANSFER_SYNTAXES {
            options = options.with_transfer_syntax(*uid);
        }
        let tls = config.tls.as_ref().map(|t| t.server_config.clone());
        if let Some(tls) = &tls {
            options = options.tls_config(tls.clone());
        }
        Self { options, policy, tls, timeout: config.dicom_timeout, max_associations: config.max_associations }
    }

    /// The options for a connection from `peer`.
    fn options_for(&self, peer: IpAddr) -> Options {
        self.options.clone().ae_access_control(Gate::new(self.policy.clone(), peer))
    }
}

/// Serves one connection until it ends. Never fails: problems end this association only.
pub async fn serve(
    acceptor: Arc<Acceptor>,
    ctx: Arc<StoreContext>,
    socket: TcpStream,
    peer: SocketAddr,
    abort: CancellationToken,
) {
    let span = info_span!(
        "association",
        peer = %peer,
        tls = acceptor.tls.is_some(),
        calling_ae = tracing::field::Empty,
        called_ae = tracing::field::Empty
    );
    async move {
        let _active = ctx.metrics.association_opened();
        let options = acceptor.options_for(peer.ip());
        let (timeout, metrics) = (acceptor.timeout, &*ctx.metrics);
        if acceptor.tls.is_some() {
            if let Some(assoc) = establish(options.establish_tls_async(socket), timeout, metrics, &abort).await {
                dimse_loop(assoc, &ctx, &abort).await;
            }
        } else if let Some(assoc) = establish(options.establish_async(socket), timeout, metrics, &abort).await {
            dimse_loop(assoc, &ctx, &abort).await;
        }
    }
    .instrument(span)
    .await;
}

/// Waits for the negotiation (bounded by `timeout`, TLS handshake included) and logs its failure.
async fn establish<S>(
    negotiation: impl Future<Output = Result<AsyncServerAssociation<S>, UlError>>,
    timeout: Duration,
    metrics: &Metrics,
    abort: &CancellationToken,
) -> Option<AsyncServerAssociation<S>> {
    let established = tokio::select! {
        _ = abort.cancelled() => return None,
        r = tokio::time::timeout(timeout, negotiation) => r,
    };
    match established {
        Ok(Ok(a)) => Some(a),
        Ok(Err(UlError::Rejected { association_rj, .. })) => {
            match association_rj.source {
                // Logged with the AE titles by the gate.
                AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::CallingAETitleNotRecognized) => {
                    metrics.reject(RejectReason::CallingAe);
                    debug!(reason = %association_rj.source, "association rejected");
                }
                AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::CalledAETitleNotRecognized) => {
                    metrics.reject(RejectReason::CalledAe);
                    debug!(reason = %association_rj.source, "association rejected");
                }
                reason => {
                    metrics.reject(RejectReason::Negotiation);
                    warn!(reason = %reason, "association rejected");
                }
            }
            None
        }
        Ok(Err(e)) => {
            metrics.reject(RejectReason::Negotiation);
            warn!(error = %chain(e), "association negotiation failed");
            None
        }
        Err(_) => {
            metrics.reject(RejectReason::Negotiation);
            warn!(timeout = ?timeout, "association negotiation timed out");
            None
        }
    }
}

/// Largest A-ASSOCIATE-RQ read from a connection that is rejected for the limit (real ones
/// are a few KiB; one proposing 128 contexts with many transfer syntaxes stays far below).
const MAX_REJECTED_RQ: usize = 256 * 1024;

/// Answers a connection beyond `BIDSFLUX_MAX_ASSOCIATIONS`: reads its A-ASSOCIATE-RQ (after the
/// TLS handshake, if any) and sends A-ASSOCIATE-RJ rejected-transient, service-provider
/// (presentation), local-limit-exceeded, so that the sender retries later.
pub async fn reject_busy(acceptor: Arc<Acceptor>, socket: TcpStream, peer: SocketAddr) {
    let span = info_span!("association", peer = %peer, tls = acceptor.tls.is_some());
    async move {
        let max = acceptor.max_associations;
        let work = async {
            match &acceptor.tls {
                None => reject_with_limit(socket, max).await,
                Some(config) => {
                    let stream = tokio_rustls::TlsAcceptor::from(config.clone()).accept(socket).await?;
                    reject_with_limit(stream, max).await
                }
            }
        };
        match tokio::time::timeout(acceptor.timeout.min(Duration::from_secs(10)), work).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), max_associations = max, "too many associations, connection closed")
            }
            Err(_) => warn!(max_associations = max, "too many associations, connection closed (no request in time)"),
        }
    }
    .instrument(span)
    .await;
}

async fn reject_with_limit<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, max: usize) -> std::io::Result<()> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut header = [0_u8; 6];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if header[0] != 0x01 || len > MAX_REJECTED_RQ {
        return Err(invalid(format!("expected an A-ASSOCIATE-RQ, got pdu type 0x{:02X} of {len} bytes", header[0])));
    }
    let mut pdu = header.to_vec();
    pdu.resize(6 + len, 0);
    stream.read_exact(&mut pdu[6..]).await?;
    let (calling_ae, called_ae) = match dicom_ul::read_pdu(&pdu[..], dicom_ul::pdu::MAXIMUM_PDU_SIZE, false) {
        Ok(Some(Pdu::AssociationRQ(rq))) => (rq.calling_ae_title, rq.called_ae_title),
        _ => return Err(invalid("malformed A-ASSOCIATE-RQ".to_owned())),
    };
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut out = Vec::with_capacity(10);
    dicom_ul::write_pdu(&mut out, &rj).map_err(|e| invalid(e.to_string()))?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    warn!(
        calling_ae = %calling_ae,
        called_ae = %called_ae,
        max_associations = max,
        "association rejected: too many associations (local limit exceeded)"
    );
    // Lingering close: send our close (TLS close_notify, then FIN), then read until the peer
    // closes too. Dropping the socket while the peer's own close_notify (or anything else) is
    // still unread makes the kernel answer with a reset, and a peer that had not yet read the
    // RJ then sees "connection reset" instead of the rejection.
    let _ = stream.shutdown().await;
    let mut sink = [0_u8; 512];
    let _ =
        tokio::time::timeout(LINGER, async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} }).await;
    Ok(())
}

/// How long a rejected connection is kept open for the peer to read the A-ASSOCIATE-RJ and close.
const LINGER: Duration = Duration::from_secs(2);

/// The DIMSE loop of an established association.
async fn dimse_loop<S>(mut assoc: AsyncServerAssociation<S>, ctx: &StoreContext, abort: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::Span::current();
    span.record("calling_ae", assoc.peer_ae_title());
    span.record("called_ae", assoc.called_ae_title());
    let refused: Vec<_> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason != PresentationContextResultReason::Acceptance)
        .collect();
    for pc in &refused {
        debug!(context = pc.id, abstract_syntax = %pc.abstract_syntax, reason = ?pc.reason, "presentation context refused");
    }
    info!(max_pdu = assoc.requestor_max_pdu_length(), refused_contexts = refused.len(), "association established");
    let mut dimse = Dimse {
        ctx,
        contexts: assoc
            .presentation_contexts()
            .iter()
            .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .cloned()
            .collect(),
        calling_ae: assoc.peer_ae_title().to_owned(),
        called_ae: assoc.called_ae_title().to_owned(),
        state: State::Idle,
    };
    loop {
        let received = tokio::select! {
            biased;
            _ = abort.cancelled() => {
                warn!("shutdown grace period over, aborting association");
                let _ = assoc.abort().await;
                return;
            }
            r = assoc.receive() => r,
        };
        match received {
            Ok(Pdu::PData { data }) => {
                for pdv in data {
                    match dimse.handle(pdv).await {
                        Ok(None) => {}
                        Ok(Some(reply)) => {
                            if let Err(e) = send_command(&mut assoc, reply).await {
                                warn!(error = %chain(e), "cannot send response, closing association");
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(error = %format!("{e:#}"), "dimse protocol error, aborting association");
                            let _ = assoc.abort().await;
                            return;
                        }
                    }
                }
            }
            Ok(Pdu::ReleaseRQ) => {
                if dimse.busy() {
                    warn!("release requested in the middle of a message, partial instance discarded");
                }
                drop(dimse);
                if let Err(e) = assoc.send(&Pdu::ReleaseRP).await {
                    warn!(error = %chain(e), "cannot confirm release");
                }
                info!("association released");
                return;
            }
            Ok(Pdu::AbortRQ { source }) => {
                info!(source = ?source, "association aborted by peer");
                return;
            }
            Ok(other) => {
                warn!(pdu = %other.short_description(), "unexpected pdu, aborting association");
                let _ = assoc.abort().await;
                return;
            }
            Err(e @ UlError::ConnectionClosed { .. }) => {
                warn!(error = %chain(e), "peer closed the connection without release");
                return;
            }
            Err(e) => {
                warn!(error = %chain(e), "cannot receive pdu, aborting association");
                let _ = assoc.abort().await;
                return;
            }
        }
    }
}

/// A response command to send on a presentation context.
#[derive(Debug)]
pub struct Reply {
    pc_id: u8,
    command: Vec<u8>,
}

async fn send_command<S>(assoc: &mut AsyncServerAssociation<S>, reply: Reply) -> Result<(), UlError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let pdu = Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: reply.pc_id,
            value_type: PDataValueType::Command,
            is_last: true,
            data: reply.command,
        }],
    };
    assoc.send(&pdu).await
}

/// Where the DIMSE exchange stands.
#[derive(Debug)]
enum State {
    /// Waiting for a command.
    Idle,
    /// Command fragments are arriving.
    Command { pc_id: u8, buf: Vec<u8> },
    /// A C-STORE data set is arriving.
    Data { pc_id: u8, message_id: u16, sop_class_uid: String, sop_instance_uid: String, store: Box<IncomingStore> },
}

/// A peer that does not follow the DIMSE protocol (the association is aborted).
#[derive(Debug, thiserror::Error)]
enum ProtocolError {
    #[error("presentation context {0} was not accepted")]
    UnknownContext(u8),
    #[error("fragment on presentation context {got} while a message on {expected} is incomplete")]
    InterleavedContext { expected: u8, got: u8 },
    #[error("data set fragment without a command")]
    DataWithoutCommand,
    #[error("command fragment while a data set is incomplete")]
    CommandDuringData,
    #[error("command set longer than {} bytes", dimse::MAX_COMMAND_LEN)]
    CommandTooLong,
    #[error(transparent)]
    Command(#[from] dimse::CommandError),
    #[error("C-STORE-RQ without a data set")]
    StoreWithoutData,
    #[error("C-ECHO-RQ with a data set")]
    EchoWithData,
    #[error("unsupported command 0x{0:04X}")]
    UnsupportedCommand(u16),
}

/// The DIMSE side of an association.
struct Dimse<'a> {
    ctx: &'a StoreContext,
    contexts: Vec<PresentationContextNegotiated>,
    calling_ae: String,
    called_ae: String,
    state: State,
}

impl Dimse<'_> {
    /// Whether a message is partly received.
    fn busy(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    fn context(&self, pc_id: u8) -> Result<&PresentationContextNegotiated, ProtocolError> {
        self.contexts.iter().find(|pc| pc.id == pc_id).ok_or(ProtocolError::UnknownContext(pc_id))
    }

    /// Handles one PDV; returns the response to send when a message is complete.
    async fn handle(&mut self, pdv: PDataValue) -> Result<Option<Reply>, ProtocolError> {
        let pc_id = pdv.presentation_context_id;
        self.context(pc_id)?;
        match (std::mem::replace(&mut self.state, State::Idle), pdv.value_type.clone()) {
            (State::Idle, PDataValueType::Command) => self.command_fragment(pc_id, Vec::new(), pdv).await,
            (State::Command { pc_id: expected, buf }, PDataValueType::Command) => {
                if expected != pc_id {
                    return Err(ProtocolError::InterleavedContext { expected, got: pc_id });
                }
                self.command_fragment(pc_id, buf, pdv).await
            }
            (State::Idle | State::Command { .. }, PDataValueType::Data) => Err(ProtocolError::DataWithoutCommand),
            (State::Data { .. }, PDataValueType::Command) => Err(ProtocolError::CommandDuringData),
            (State::Data { pc_id: expected, message_id, sop_class_uid, sop_instance_uid, mut store }, _) => {
                if expected != pc_id {
                    return Err(ProtocolError::InterleavedContext { expected, got: pc_id });
                }
                store.data(&pdv.data).await;
                if !pdv.is_last {
                    self.state = State::Data { pc_id, message_id, sop_class_uid, sop_instance_uid, store };
                    return Ok(None);
                }
                let outcome = store.complete(self.ctx).await;
                let command = Response {
                    field: dimse::C_STORE_RSP,
                    message_id_being_responded_to: message_id,
                    status: outcome.status,
                    affected_sop_class_uid: Some(&sop_class_uid),
                    affected_sop_instance_uid: Some(&sop_instance_uid),
                    error_comment: outcome.comment.as_deref(),
                }
                .encode()?;
                Ok(Some(Reply { pc_id, command }))
            }
        }
    }

    async fn command_fragment(
        &mut self,
        pc_id: u8,
        mut buf: Vec<u8>,
        pdv: PDataValue,
    ) -> Result<Option<Reply>, ProtocolError> {
        if buf.len() + pdv.data.len() > dimse::MAX_COMMAND_LEN {
            return Err(ProtocolError::CommandTooLong);
        }
        buf.extend_from_slice(&pdv.data);
        if !pdv.is_last {
            self.state = State::Command { pc_id, buf };
            return Ok(None);
        }
        let command = dimse::parse_command(&buf)?;
        self.dispatch(pc_id, command).await
    }

    async fn dispatch(&mut self, pc_id: u8, command: Command) -> Result<Option<Reply>, ProtocolError> {
        match command.field {
            dimse::C_ECHO_RQ => {
                if command.has_data_set {
                    return Err(ProtocolError::EchoWithData);
                }
                tracing::debug!("c-echo");
                let reply = Response {
                    field: dimse::C_ECHO_RSP,
                    message_id_being_responded_to: command.message_id,
                    status: dimse::status::SUCCESS,
                    affected_sop_class_uid: Some(
                        command.affected_sop_class_uid.as_deref().unwrap_or(uids::VERIFICATION),
                    ),
                    affected_sop_instance_uid: None,
                    error_comment: None,
                }
                .encode()?;
                Ok(Some(Reply { pc_id, command: reply }))
            }
            dimse::C_STORE_RQ => {
                if !command.has_data_set {
                    return Err(ProtocolError::StoreWithoutData);
                }
                let context = self.context(pc_id)?;
                let transfer_syntax_uid = context.transfer_syntax.trim_end_matches(['\0', ' ']).to_owned();
                let context_sop_class_uid = context.abstract_syntax.trim_end_matches(['\0', ' ']).to_owned();
                let sop_class_uid = command.affected_sop_class_uid.unwrap_or_default();
                let sop_instance_uid = command.affected_sop_instance_uid.unwrap_or_default();
                let request = StoreRequest {
                    sop_class_uid: sop_class_uid.clone(),
                    context_sop_class_uid,
                    sop_instance_uid: sop_instance_uid.clone(),
                    transfer_syntax_uid,
                    calling_ae_title: self.calling_ae.clone(),
                    called_ae_title: self.called_ae.clone(),
                };
                let store = Box::new(IncomingStore::begin(self.ctx, request).await);
                self.state =
                    State::Data { pc_id, message_id: command.message_id, sop_class_uid, sop_instance_uid, store };
                Ok(None)
            }
            // Nothing we do can be cancelled.
            dimse::C_CANCEL_RQ => Ok(None),
            other => Err(ProtocolError::UnsupportedCommand(other)),
        }
    }
}

/// An error with its sources, for logs. PDUs are only summarised: their
/// debug form would print P-DATA bytes, which can hold patient values.
fn chain(e: UlError) -> String {
    match e {
        UlError::UnexpectedPdu { pdu, .. } => format!("unexpected pdu {}", pdu.short_description()),
        UlError::UnknownPdu { pdu, .. } => format!("unknown pdu {}", pdu.short_description()),
        e => format!("{:#}", anyhow::Error::new(e)),
    }
}
