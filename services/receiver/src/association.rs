//! One association: negotiation, then the DIMSE loop (C-ECHO, C-STORE) until
//! release, abort, a protocol error, or the end of the shutdown grace period.

use std::net::SocketAddr;
use std::sync::Arc;

use dicom_dictionary_std::uids;
use dicom_ul::Pdu;
use dicom_ul::association::server::{AcceptCalledAeTitle, DefaultNegotiation};
use dicom_ul::association::{Association as _, AsyncServerAssociation, Error as UlError, ServerAssociationOptions};
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextNegotiated, PresentationContextResultReason};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

use crate::Config;
use crate::dimse::{self, Command, Response};
use crate::store::{IncomingStore, StoreContext, StoreRequest};

/// Siemens CSA Non-Image Storage: private SOP class in which Siemens MR scanners send
/// spectroscopy raw data and protocol reports; research sites need it archived.
pub const SIEMENS_CSA_NON_IMAGE_STORAGE: &str = "1.3.12.2.1107.5.9.1";

/// The SOP classes we accept: Verification and the storage classes seen at imaging sites.
pub const ABSTRACT_SYNTAXES: &[&str] = &[
    uids::VERIFICATION,
    uids::MR_IMAGE_STORAGE,
    uids::ENHANCED_MR_IMAGE_STORAGE,
    uids::ENHANCED_MR_COLOR_IMAGE_STORAGE,
    uids::LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE,
    uids::MR_SPECTROSCOPY_STORAGE,
    uids::CT_IMAGE_STORAGE,
    uids::ENHANCED_CT_IMAGE_STORAGE,
    uids::LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    uids::POSITRON_EMISSION_TOMOGRAPHY_IMAGE_STORAGE,
    uids::ENHANCED_PET_IMAGE_STORAGE,
    uids::LEGACY_CONVERTED_ENHANCED_PET_IMAGE_STORAGE,
    uids::NUCLEAR_MEDICINE_IMAGE_STORAGE,
    uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_SINGLE_BIT_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_GRAYSCALE_BYTE_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_GRAYSCALE_WORD_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_TRUE_COLOR_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::RAW_DATA_STORAGE,
    uids::ENCAPSULATED_PDF_STORAGE,
    uids::GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
    uids::ULTRASOUND_IMAGE_STORAGE,
    uids::ULTRASOUND_MULTI_FRAME_IMAGE_STORAGE,
    uids::X_RAY_ANGIOGRAPHIC_IMAGE_STORAGE,
    uids::ENHANCED_XA_IMAGE_STORAGE,
    SIEMENS_CSA_NON_IMAGE_STORAGE,
];

/// Explicit VR Big Endian: retired by the standard, still sent by old equipment.
pub const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";

/// Transfer syntaxes we accept (dicom-ul takes the first one the peer proposes that is listed
/// here). Data sets are stored as received
/// (never transcoded), so these are the ones whose header we can read to file the instance.
pub const TRANSFER_SYNTAXES: &[&str] =
    &[uids::EXPLICIT_VR_LITTLE_ENDIAN, uids::IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN];

/// Negotiation options of the service.
pub type Options = ServerAssociationOptions<'static, AcceptCalledAeTitle, DefaultNegotiation>;

/// Builds the negotiation options from the configuration.
pub fn options(config: &Config) -> Options {
    let mut opts = ServerAssociationOptions::new()
        .accept_called_ae_title()
        .ae_title(config.ae_title.clone())
        .max_pdu_length(config.max_pdu)
        .read_timeout(config.dicom_timeout)
        .write_timeout(config.dicom_timeout);
    for uid in ABSTRACT_SYNTAXES {
        opts = opts.with_abstract_syntax(*uid);
    }
    for uid in TRANSFER_SYNTAXES {
        opts = opts.with_transfer_syntax(*uid);
    }
    opts
}

/// Serves one connection until it ends. Never fails: problems end this association only.
pub async fn serve(
    options: Arc<Options>,
    ctx: Arc<StoreContext>,
    socket: TcpStream,
    peer: SocketAddr,
    abort: CancellationToken,
) {
    let span = info_span!(
        "association",
        peer = %peer,
        calling_ae = tracing::field::Empty,
        called_ae = tracing::field::Empty
    );
    async move {
        let established = tokio::select! {
            _ = abort.cancelled() => return,
            r = options.establish_async(socket) => r,
        };
        let mut assoc = match established {
            Ok(a) => a,
            Err(UlError::Rejected { association_rj, .. }) => {
                warn!(reason = %association_rj.source, "association rejected");
                return;
            }
            Err(e) => {
                warn!(error = %chain(e), "association negotiation failed");
                return;
            }
        };
        let span = tracing::Span::current();
        span.record("calling_ae", assoc.peer_ae_title());
        span.record("called_ae", assoc.called_ae_title());
        info!(max_pdu = assoc.requestor_max_pdu_length(), "association established");
        let mut dimse = Dimse {
            ctx: &ctx,
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
                                warn!(error = %e, "dimse protocol error, aborting association");
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
    .instrument(span)
    .await;
}

/// A response command to send on a presentation context.
#[derive(Debug)]
pub struct Reply {
    pc_id: u8,
    command: Vec<u8>,
}

async fn send_command(assoc: &mut AsyncServerAssociation<TcpStream>, reply: Reply) -> Result<(), UlError> {
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
                let transfer_syntax_uid = self.context(pc_id)?.transfer_syntax.trim_end_matches(['\0', ' ']).to_owned();
                let sop_class_uid = command.affected_sop_class_uid.unwrap_or_default();
                let sop_instance_uid = command.affected_sop_instance_uid.unwrap_or_default();
                let request = StoreRequest {
                    sop_class_uid: sop_class_uid.clone(),
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
