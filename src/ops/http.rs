//! `/metrics` (Prometheus text) and `/healthz` (200, or 503 with the reasons as JSON).
//!
//! A deliberately tiny HTTP/1.1 responder: two GET routes for a scraper on a trusted network.
//! A framework (axum + hyper) cost 0.26 MB of the 6 MB arm64 binary budget for this. Each
//! connection gets one request (5 s to send its head, 8 KiB at most) and is closed after the
//! response; connections are handled in their own tasks, so a slow client blocks nobody.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::metrics::Metrics;

/// Reports why the gateway is unhealthy (empty when healthy).
pub type HealthFn = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Bind `addr` (before anything else starts, so a taken port fails the start early).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// Serve on a bound listener until the task is aborted.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: HealthFn,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let (m, h) = (metrics.clone(), health.clone());
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &m, &h).await {
                            tracing::debug!(error = %e, "metrics endpoint: request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    health: &HealthFn,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        ("GET", "/healthz") => {
            let reasons = health();
            let body = serde_json::json!({ "healthy": reasons.is_empty(), "reasons": reasons })
                .to_string();
            let status = if reasons.is_empty() {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "application/json", body)
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /healthz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn routes_and_a_slow_client_does_not_block_others() {
        let metrics = Metrics::new();
        metrics.readings_received.inc();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h = healthy.clone();
        let health: HealthFn = Arc::new(move || {
            if h.load(std::sync::atomic::Ordering::SeqCst) {
                vec![]
            } else {
                vec!["queue writer not responding".into()]
            }
        });
        let (listener, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let task = serve(listener, metrics, health);
        // A client that connects and sends nothing.
        let _idle = TcpStream::connect(addr).await.unwrap();
        let m = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
        assert!(m.contains("edgegate_readings_received_total 1"), "{m}");
        let ok = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.contains("\"healthy\":true"),
            "{ok}"
        );
        healthy.store(false, std::sync::atomic::Ordering::SeqCst);
        let bad = get(addr, "GET /healthz HTTP/1.0\r\n\r\n").await;
        assert!(
            bad.starts_with("HTTP/1.1 503") && bad.contains("queue writer not responding"),
            "{bad}"
        );
        assert!(get(addr, "GET /nope HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        task.abort();
    }
}
