//! Character devices that carry QMP monitors: unix and TCP sockets (as a
//! server, one client at a time like QEMU, or as a client) and stdio.

use std::future::Future;
use std::sync::Arc;

use qmp::Monitor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cli::ChardevBackend;

/// Starts serving `monitor` on `backend`. With `wait=on` (QEMU's default
/// for servers) this returns only once the first client has connected.
pub async fn serve(
    backend: ChardevBackend,
    monitor: Arc<Monitor>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, String> {
    match backend {
        ChardevBackend::Socket {
            path,
            server: true,
            wait,
        } => {
            // QEMU replaces a stale socket file.
            let _ = std::fs::remove_file(&path);
            let listener = Arc::new(
                UnixListener::bind(&path)
                    .map_err(|e| format!("Failed to bind socket to {}: {e}", path.display()))?,
            );
            // Whoever can connect controls the daemon: owner only (QEMU
            // leaves the umask's mode, usually 0755).
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("Failed to restrict {}: {e}", path.display()))?;
            let accept = move || {
                let l = listener.clone();
                async move { l.accept().await.map(|(s, _)| s) }
            };
            let task = listen(wait, accept, monitor, stop).await?;
            Ok(tokio::spawn(async move {
                let _ = task.await;
                let _ = std::fs::remove_file(&path);
            }))
        }
        ChardevBackend::Socket {
            path,
            server: false,
            ..
        } => {
            let stream = UnixStream::connect(&path)
                .await
                .map_err(|e| format!("Failed to connect to '{}': {e}", path.display()))?;
            Ok(tokio::spawn(session(stream, monitor, stop)))
        }
        ChardevBackend::Tcp {
            host,
            port,
            server: true,
            wait,
        } => {
            let listener = Arc::new(
                TcpListener::bind(format!("{host}:{port}"))
                    .await
                    .map_err(|e| format!("Failed to bind socket to {host}:{port}: {e}"))?,
            );
            let accept = move || {
                let l = listener.clone();
                async move { l.accept().await.map(|(s, _)| s) }
            };
            listen(wait, accept, monitor, stop).await
        }
        ChardevBackend::Tcp {
            host,
            port,
            server: false,
            ..
        } => {
            let stream = TcpStream::connect(format!("{host}:{port}"))
                .await
                .map_err(|e| format!("Failed to connect to '{host}:{port}': {e}"))?;
            Ok(tokio::spawn(session(stream, monitor, stop)))
        }
        ChardevBackend::Stdio => Ok(tokio::spawn(async move {
            if let Err(e) = monitor
                .serve(tokio::io::stdin(), tokio::io::stdout(), stop)
                .await
            {
                tracing::debug!("stdio monitor ended: {e}");
            }
        })),
    }
}

/// Serves the clients `accept` brings, on a task of their own; with
/// `wait`, the first one must have come before this returns (QEMU's
/// `wait=on`).
async fn listen<S, F, Fut>(
    wait: bool,
    mut accept: F,
    monitor: Arc<Monitor>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, String>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<S>> + Send + 'static,
{
    let first = if wait {
        Some(accept().await.map_err(|e| e.to_string())?)
    } else {
        None
    };
    Ok(tokio::spawn(accept_loop(first, accept, monitor, stop)))
}

/// Serves clients one after another (further clients wait in the backlog,
/// as with QEMU's socket chardev), until `stop`.
async fn accept_loop<S, F, Fut>(
    first: Option<S>,
    mut accept: F,
    monitor: Arc<Monitor>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
{
    if let Some(stream) = first {
        session(stream, monitor.clone(), stop.clone()).await;
    }
    loop {
        if *stop.borrow() {
            return;
        }
        let stream = tokio::select! {
            r = accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("monitor: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => return,
        };
        session(stream, monitor.clone(), stop.clone()).await;
    }
}

async fn session<S>(stream: S, monitor: Arc<Monitor>, stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    if let Err(e) = monitor.serve(reader, writer, stop).await {
        tracing::debug!("monitor session ended: {e}");
    }
}
