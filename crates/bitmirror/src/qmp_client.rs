//! A small synchronous QMP client for the CLI's verbs: it talks to
//! `bitmirror serve` or to qemu-storage-daemon over a unix socket.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};

/// A negotiated QMP session.
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for a reply, oldest first.
    events: VecDeque<Value>,
}

impl QmpClient {
    /// Connects to the monitor at `path` and leaves capabilities
    /// negotiation.
    pub fn connect(path: &Path) -> anyhow::Result<QmpClient> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to the QMP socket {}", path.display()))?;
        let writer = stream.try_clone().context("cannot share the QMP socket")?;
        let mut client = QmpClient {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
        };
        let greeting = client
            .read_message(None)?
            .context("the monitor closed at once")?;
        if greeting.get("QMP").is_none() {
            bail!("{} is not a QMP monitor: {greeting}", path.display());
        }
        client.execute("qmp_capabilities", json!({}))?;
        Ok(client)
    }

    /// One message, or `None` when `timeout` passed first.
    fn read_message(&mut self, timeout: Option<Duration>) -> anyhow::Result<Option<Value>> {
        self.reader
            .get_ref()
            .set_read_timeout(timeout)
            .context("cannot set a read timeout")?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => bail!("the daemon closed the QMP connection"),
            Ok(_) => Ok(Some(
                serde_json::from_str(&line).with_context(|| format!("bad QMP message: {line}"))?,
            )),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).context("cannot read from the QMP socket"),
        }
    }

    /// Runs `command`; its `return`, or its error's description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").context("cannot write to the QMP socket")?;
        loop {
            let m = self
                .read_message(None)?
                .context("the daemon closed the QMP connection")?;
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else if let Some(r) = m.get("return") {
                return Ok(r.clone());
            } else if let Some(e) = m.get("error") {
                return Err(anyhow!(
                    "{command}: {}",
                    e["desc"].as_str().unwrap_or("unknown error")
                ));
            } else {
                bail!("unexpected QMP message: {m}");
            }
        }
    }

    /// The next event, waiting at most `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> anyhow::Result<Option<Value>> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        match self.read_message(Some(timeout))? {
            Some(m) if m.get("event").is_some() => Ok(Some(m)),
            Some(m) => bail!("unexpected QMP message: {m}"),
            None => Ok(None),
        }
    }

    /// Waits for block job `job` to end (`BLOCK_JOB_COMPLETED`), or with
    /// `ready` also for its `BLOCK_JOB_READY`, at most `timeout`; the bytes
    /// it reports done. A job that ends with an error or is cancelled is an
    /// error. Other events are dropped.
    pub fn wait_block_job(
        &mut self,
        job: &str,
        ready: bool,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.next_event(Duration::from_millis(100))? {
                if e["data"]["device"] != job {
                    continue;
                }
                let offset = e["data"]["offset"].as_u64().unwrap_or(0);
                match e["event"].as_str() {
                    Some("BLOCK_JOB_READY") if ready => return Ok(offset),
                    Some("BLOCK_JOB_COMPLETED") => match e["data"]["error"].as_str() {
                        Some(err) => bail!("job '{job}' failed: {err}"),
                        None => return Ok(offset),
                    },
                    Some("BLOCK_JOB_CANCELLED") => bail!("job '{job}' was cancelled"),
                    _ => {}
                }
            }
            if std::time::Instant::now() > deadline {
                bail!("job '{job}' did not finish within {} s", timeout.as_secs());
            }
        }
    }
}
