//! Opening the link: connect (or adopt the fd), read QEMU's greeting, negotiate
//! capabilities and read what the gateway needs to know (status, schema), each
//! step under its own deadline.

use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use qmpgate_protocol::chardev::ChardevSpec;
use qmpgate_protocol::framing::{Frame, Framer};
use qmpgate_protocol::qmp::{self, QemuMessage as Message};

use super::*;
use crate::io::{self, FdTable};

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = io::pass::LinkWriter;

/// An open, negotiated link.
pub(super) struct Link {
    pub(super) reader: Reader,
    pub(super) writer: Writer,
    pub(super) framer: Framer,
    /// Frames read during negotiation after its last reply (events QEMU sent in
    /// the same write): the task handles them first, so none is lost.
    pub(super) early: VecDeque<Frame>,
    pub(super) info: UpstreamInfo,
}

/// The negotiation's reader: it owns the frames of each read, so messages QEMU
/// sends together (an event and a reply in one write) are all seen, in order.
struct Negotiation {
    reader: Reader,
    /// Each step's deadline ([`Liveness::negotiation`]).
    step_timeout: Duration,
    framer: Framer,
    frames: VecDeque<Frame>,
}

impl Negotiation {
    async fn next(&mut self) -> Result<Message, UpstreamError> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return match frame {
                    Frame::Message(bytes) => qmp::parse_qemu_message(&bytes)
                        .map_err(|e| UpstreamError::Protocol(e.to_string())),
                    _ => Err(UpstreamError::Protocol("oversized message".into())),
                };
            }
            let n = self.reader.read(&mut buf).await?;
            if n == 0 {
                return Err(UpstreamError::Closed);
            }
            let mut frames = Vec::new();
            self.framer.push(&buf[..n], &mut frames);
            self.frames.extend(frames);
        }
    }

    /// Sends `step` (with id 0 and `arguments`) and returns its reply's body, within
    /// [`Liveness::negotiation`]; events that come first are dropped (nobody is
    /// subscribed yet).
    async fn execute(
        &mut self,
        writer: &mut Writer,
        step: &'static str,
        arguments: Option<Value>,
    ) -> Result<Map<String, Value>, UpstreamError> {
        let mut command = json!({"execute": step, "id": 0});
        if let Some(arguments) = arguments {
            command["arguments"] = arguments;
        }
        let timeout = self.step_timeout;
        let exchange = async {
            writer.write_all(&qmp::encode(&command)).await?;
            loop {
                if let Message::Reply { body, .. } = self.next().await? {
                    return Ok(body.into_object());
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| UpstreamError::NegotiationTimeout { step, timeout })?
    }
}

/// Opens the upstream chardev (one attempt, within [`Liveness::greeting`]), reads
/// the greeting (within [`Liveness::greeting`]) and negotiates (each step within
/// [`Liveness::negotiation`]): a peer that stalls anywhere in it cannot hang
/// start-up, `chardev-add` or a reconnect.
pub(super) async fn open(
    spec: &ChardevSpec,
    fds: &mut FdTable,
    liveness: &Liveness,
) -> Result<Link, UpstreamError> {
    // A TCP peer that drops SYNs would hold a connect for minutes: the greeting's
    // deadline covers the connect too.
    let greeting = liveness.greeting;
    let stream = tokio::time::timeout(greeting, io::connect(spec, fds))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(greeting))??;
    let (reader, mut writer) = io::pass::split(stream, None);
    let mut negotiation = Negotiation {
        reader,
        step_timeout: liveness.negotiation,
        framer: Framer::new(MAX_UPSTREAM_MESSAGE, 1024),
        frames: VecDeque::new(),
    };
    // Each step has its own deadline, so the error names the step that stalled.
    let info = negotiate(&mut negotiation, &mut writer, greeting).await?;
    Ok(Link {
        reader: negotiation.reader,
        writer,
        framer: negotiation.framer,
        early: negotiation.frames,
        info,
    })
}

/// The greeting (within `greeting_timeout`), `qmp_capabilities`, the run state and
/// the schema.
async fn negotiate(
    negotiation: &mut Negotiation,
    writer: &mut Writer,
    greeting_timeout: Duration,
) -> Result<UpstreamInfo, UpstreamError> {
    let greeting = tokio::time::timeout(greeting_timeout, negotiation.next())
        .await
        .map_err(|_| UpstreamError::NoGreeting(greeting_timeout))??;
    let Message::Greeting {
        version,
        capabilities,
    } = greeting
    else {
        return Err(UpstreamError::Protocol(format!(
            "expected a greeting, got {greeting:?}"
        )));
    };
    let oob = capabilities.iter().any(|c| c == "oob");
    let enable = oob.then(|| json!({"enable": ["oob"]}));
    let reply = negotiation
        .execute(writer, "qmp_capabilities", enable)
        .await?;
    if !reply.contains_key("return") {
        return Err(UpstreamError::Negotiation(Value::Object(reply).to_string()));
    }
    let reply = negotiation.execute(writer, "query-status", None).await?;
    let run_state = reply
        .get("return")
        .and_then(|r| r.get("status"))
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    let reply = negotiation
        .execute(writer, "query-qmp-schema", None)
        .await?;
    let schema = match reply.get("return").map(QmpSchema::from_introspection) {
        Some(Ok(schema)) => Some(SchemaRef(Arc::new(schema))),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "QEMU's QMP schema is unreadable; commands are not checked against it");
            None
        }
        None => {
            let reply = Value::Object(reply);
            tracing::warn!(%reply, "QEMU did not give its QMP schema; commands are not checked against it");
            None
        }
    };
    Ok(UpstreamInfo {
        version,
        oob,
        connected: true,
        run_state,
        lost: None,
        schema,
    })
}
