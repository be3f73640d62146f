//! One QMP session: greeting, capability negotiation, commands in order,
//! events in between.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, watch};

use crate::error::{ErrorClass, QmpError};
use crate::events::Events;
use crate::json::{self, Piece, Splitter};

/// A boxed future, as [`Dispatcher`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs commands: the daemon's side of QMP. The monitor itself answers
/// `qmp_capabilities` and checks the shape of every request; everything
/// else reaches [`dispatch`](Self::dispatch) with its arguments (an empty
/// object when the client sent none).
pub trait Dispatcher: Send + Sync + 'static {
    /// Runs `command`. Unknown commands answer [`ErrorClass::CommandNotFound`]
    /// with QEMU's text, `The command NAME has not been found`.
    fn dispatch(
        &self,
        command: String,
        arguments: Map<String, Value>,
    ) -> BoxFuture<'static, Result<Value, QmpError>>;
}

/// What a monitor offers and says in its greeting.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// The `version` object of the greeting (`{"qemu": {"major": …,
    /// "minor": …, "micro": …}, "package": …}`).
    pub version: Value,
    /// Offer the `oob` capability (QEMU does on socket monitors).
    pub oob: bool,
}

/// The text QEMU answers an unknown command with.
pub fn command_not_found(command: &str) -> QmpError {
    QmpError::new(
        ErrorClass::CommandNotFound,
        format!("The command {command} has not been found"),
    )
}

/// A QMP monitor: serves sessions over any byte stream, one at a time or
/// many at once, all sharing one dispatcher and one event stream.
pub struct Monitor {
    config: MonitorConfig,
    dispatcher: Arc<dyn Dispatcher>,
    events: Events,
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only `qmp_capabilities` is accepted; no events are sent.
    Negotiation,
    /// Commands run; events flow.
    Command {
        /// Whether the client enabled out-of-band execution.
        oob: bool,
    },
}

impl Monitor {
    /// A monitor running commands on `dispatcher` and forwarding `events`.
    pub fn new(config: MonitorConfig, dispatcher: Arc<dyn Dispatcher>, events: Events) -> Monitor {
        Monitor {
            config,
            dispatcher,
            events,
        }
    }

    /// Serves one session on `reader`/`writer` until the client hangs up,
    /// the stream fails, or `shutdown` turns true. On shutdown the events
    /// already emitted (e.g. `BLOCK_EXPORT_DELETED`) are written before
    /// returning.
    pub async fn serve<R, W>(
        &self,
        mut reader: R,
        mut writer: W,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let capabilities: Vec<&str> = if self.config.oob { vec!["oob"] } else { vec![] };
        let greeting =
            json!({"QMP": {"version": self.config.version, "capabilities": capabilities}});
        send(&mut writer, &json::to_string(&greeting)).await?;

        let mut mode = Mode::Negotiation;
        let mut events: Option<broadcast::Receiver<Arc<str>>> = None;
        let mut splitter = Splitter::new();
        let mut pieces = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut eof = false;
        loop {
            for piece in pieces.drain(..) {
                let reply = self.handle(piece, &mut mode).await;
                // Events the command caused come first, as in QEMU.
                if let Some(rx) = events.as_mut() {
                    while let Ok(event) = rx.try_recv() {
                        send(&mut writer, &event).await?;
                    }
                }
                if let Some(reply) = reply {
                    send(&mut writer, &json::to_string(&reply)).await?;
                }
                if events.is_none() && mode != Mode::Negotiation {
                    events = Some(self.events.subscribe());
                }
            }
            if eof {
                return Ok(());
            }
            tokio::select! {
                read = reader.read(&mut buf) => {
                    let n = read?;
                    if n == 0 {
                        splitter.finish(&mut pieces);
                        eof = true;
                    } else {
                        splitter.feed(&buf[..n], &mut pieces);
                    }
                }
                event = next_event(&mut events) => {
                    if let Some(event) = event {
                        send(&mut writer, &event).await?;
                    }
                }
                () = stopped(&mut shutdown) => {
                    if let Some(rx) = events.as_mut() {
                        while let Ok(event) = rx.try_recv() {
                            send(&mut writer, &event).await?;
                        }
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Answers one piece of input; `None` when it needs no answer.
    async fn handle(&self, piece: Piece, mode: &mut Mode) -> Option<Value> {
        let text = match piece {
            Piece::Text(text) => text,
            Piece::Error(e) => return Some(error_reply(&QmpError::generic(e), None)),
        };
        let value: Value = match serde_json::from_slice(&json::requote(&text)) {
            Ok(v) => v,
            Err(e) => {
                let desc = format!("JSON parse error, {}", parse_error_text(&e));
                return Some(error_reply(&QmpError::generic(desc), None));
            }
        };
        let Value::Object(request) = value else {
            return Some(error_reply(
                &QmpError::generic("QMP input must be a JSON object"),
                None,
            ));
        };
        let id = request.get("id").cloned();
        let oob_enabled = *mode == Mode::Command { oob: true };
        let result = match check_request(&request, oob_enabled) {
            Ok(call) => self.run(call, mode).await,
            Err(e) => Err(e),
        };
        Some(match result {
            Ok(ret) => {
                let mut reply = json!({"return": ret});
                if let Some(id) = id {
                    reply["id"] = id;
                }
                reply
            }
            Err(e) => error_reply(&e, id),
        })
    }

    async fn run(&self, call: Call, mode: &mut Mode) -> Result<Value, QmpError> {
        if call.oob {
            let Mode::Command { oob: true } = *mode else {
                return Err(QmpError::generic(
                    "QMP input member 'exec-oob' is unexpected",
                ));
            };
            // No command of ours is allowed out of band (none is in QEMU's
            // storage daemon either).
            return Err(QmpError::generic(format!(
                "The command {} does not support OOB",
                call.command
            )));
        }
        match (*mode, call.command.as_str()) {
            (Mode::Negotiation, "qmp_capabilities") => {
                let oob = self.negotiate(call.arguments)?;
                *mode = Mode::Command { oob };
                Ok(json!({}))
            }
            (Mode::Negotiation, _) => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )),
            (Mode::Command { .. }, "qmp_capabilities") => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            )),
            (Mode::Command { .. }, _) => {
                self.dispatcher.dispatch(call.command, call.arguments).await
            }
        }
    }

    /// Checks `qmp_capabilities`' arguments; whether `oob` was enabled.
    fn negotiate(&self, arguments: Map<String, Value>) -> Result<bool, QmpError> {
        let mut args = qapi::Object::json(&Value::Object(arguments))?;
        let enable = args.opt_list("enable")?.unwrap_or_default();
        args.finish()?;
        let mut oob = false;
        for (name, cap) in enable {
            match cap {
                Value::String(s) if s == "oob" => {
                    if !self.config.oob {
                        return Err(QmpError::generic("Capability 'oob' not available"));
                    }
                    oob = true;
                }
                // QEMU names an enum list element 'null' here.
                Value::String(s) => {
                    return Err(qapi::Error::InvalidValue {
                        name: "null".into(),
                        value: s,
                    }
                    .into());
                }
                _ => {
                    return Err(qapi::Error::InvalidParameterType {
                        name,
                        expected: "string",
                    }
                    .into());
                }
            }
        }
        Ok(oob)
    }
}

/// A request that passed the shape checks.
struct Call {
    command: String,
    arguments: Map<String, Value>,
    oob: bool,
}

/// QEMU's checks of a request's members, in QEMU's order. `exec-oob` is
/// an unexpected member unless the session enabled `oob`.
fn check_request(request: &Map<String, Value>, oob_enabled: bool) -> Result<Call, QmpError> {
    let mut command = None;
    let mut oob = false;
    let mut arguments = Map::new();
    for (key, value) in request {
        match key.as_str() {
            "execute" | "exec-oob" if key == "execute" || oob_enabled => {
                let Value::String(name) = value else {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' must be a string"
                    )));
                };
                if command.is_some() {
                    return Err(QmpError::generic(
                        "QMP input must not contain both 'execute' and 'exec-oob'",
                    ));
                }
                command = Some(name.clone());
                oob = key == "exec-oob";
            }
            "arguments" => {
                let Value::Object(args) = value else {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                };
                arguments = args.clone();
            }
            "id" => {}
            _ => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{key}' is unexpected"
                )));
            }
        }
    }
    let command = command.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    Ok(Call {
        command,
        arguments,
        oob,
    })
}

fn error_reply(e: &QmpError, id: Option<Value>) -> Value {
    let mut reply = json!({"error": e.to_json()});
    if let Some(id) = id {
        reply["id"] = id;
    }
    reply
}

/// serde_json's description of a syntax error without its position.
fn parse_error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

/// Returns once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn next_event(events: &mut Option<broadcast::Receiver<Arc<str>>>) -> Option<Arc<str>> {
    let Some(rx) = events.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(event) => return Some(event),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("a monitor fell behind and lost {n} events");
            }
            Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, line: &str) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 2);
    bytes.extend_from_slice(line.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    writer.write_all(&bytes).await?;
    writer.flush().await
}
