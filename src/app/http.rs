//! The HTTP listener (`metrics.listen`): `/metrics` (Prometheus text), `/healthz` (200, or 503
//! with the reasons as JSON), the status page `/` and its JSON API `/api/...` (see
//! [`super::web`]). GET only.
//!
//! hyper (HTTP/1.1 only) does the protocol; what we keep from the hand-written responder it
//! replaced: a client has 5 s to send a request head ([`READ_TIMEOUT`], also while a kept-alive
//! connection waits for its next request), heads are at most 8 KiB ([`MAX_HEAD`]), and every
//! connection has its own task, so a slow client blocks nobody. Added: at most
//! [`MAX_CONNECTIONS`] connections at once (more are closed at once), a connection lives at most
//! [`MAX_LIFETIME`] (then it is closed after its current response), an answer takes at most
//! [`ANSWER_TIMEOUT`]. `/metrics` and `/healthz` close the connection after the response, as
//! before; the page's polls keep theirs open.
//!
//! Layer: app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::web::{access::Denied, Web, PAGE};
use crate::core::metrics::Metrics;

/// Reports why the gateway is unhealthy (empty when healthy).
pub type HealthFn = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Longest request head (hyper's smallest read buffer).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time to send a request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection is closed after this long (after the response in progress, if any).
pub const MAX_LIFETIME: Duration = Duration::from_secs(120);
/// Longest time to produce an answer (password check, rules stage, queue writer).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Bind `addr` (before anything else starts, so a taken port fails the start early).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// What the listener serves.
#[derive(Clone)]
pub struct Routes {
    pub metrics: Arc<Metrics>,
    pub health: HealthFn,
    /// The status page and API (`None`: only `/metrics` and `/healthz`).
    pub web: Option<Arc<Web>>,
}

/// Serve on a bound listener until the task is aborted.
pub fn serve(listener: TcpListener, routes: Routes) -> tokio::task::JoinHandle<()> {
    let sampler = routes.web.clone().map(Web::sample);
    tokio::spawn(async move {
        // The page's queue sampler runs in this task: aborting it stops both.
        let sampler = async {
            match sampler {
                Some(s) => s.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = accept(listener, routes) => {}
            _ = sampler => std::future::pending().await,
        }
    })
}

async fn accept(listener: TcpListener, routes: Routes) {
    {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!("http: {MAX_CONNECTIONS} connections open; closing a new one");
                continue;
            };
            let routes = routes.clone();
            tokio::spawn(async move {
                connection(stream, routes).await;
                drop(slot);
            });
        }
    }
}

async fn connection(stream: tokio::net::TcpStream, routes: Routes) {
    let service = hyper::service::service_fn(move |req| {
        let routes = routes.clone();
        async move {
            let res = match tokio::time::timeout(ANSWER_TIMEOUT, respond(&routes, req)).await {
                Ok(r) => r,
                Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "timed out\n"),
            };
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .max_headers(64);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http: connection ended");
            }
            return;
        }
        _ = tokio::time::sleep(MAX_LIFETIME) => conn.as_mut().graceful_shutdown(),
    }
    // The response in progress may finish; a client that does not read it is cut.
    let _ = tokio::time::timeout(READ_TIMEOUT, conn).await;
}

type Res = Response<Full<Bytes>>;

fn response(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Res {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Res {
    response(status, "text/plain; charset=utf-8", body)
}

fn json(status: StatusCode, body: &serde_json::Value) -> Res {
    response(status, "application/json", body.to_string())
}

/// `/metrics` and `/healthz` answer and close, like the responder before hyper.
fn closing(mut r: Res) -> Res {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn respond(routes: &Routes, req: Request<hyper::body::Incoming>) -> Res {
    if req.method() != Method::GET {
        return closing(text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"));
    }
    let path = req.uri().path();
    match path {
        "/metrics" => {
            return closing(response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                routes.metrics.render(),
            ))
        }
        "/healthz" => {
            let reasons = (routes.health)();
            let status = if reasons.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({ "healthy": reasons.is_empty(), "reasons": reasons });
            return closing(json(status, &body));
        }
        _ => {}
    }
    let Some(web) = &routes.web else {
        return closing(text(StatusCode::NOT_FOUND, "try /metrics or /healthz\n"));
    };
    if path != "/" && !path.starts_with("/api/") {
        return text(
            StatusCode::NOT_FOUND,
            "try / (status page), /api/status, /metrics or /healthz\n",
        );
    }
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if let Err(d) = web.access.check(auth).await {
        return denied(d);
    }
    if path == "/" {
        let mut r = response(StatusCode::OK, "text/html; charset=utf-8", PAGE);
        let h = r.headers_mut();
        // Everything is inline; the page talks only to this listener.
        if let Ok(csp) = HeaderValue::from_str(super::web::content_security_policy()) {
            h.insert(header::CONTENT_SECURITY_POLICY, csp);
        }
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        return r;
    }
    let query = req.uri().query().unwrap_or("");
    match web.api(path, query).await {
        Some(a) => response(
            StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "application/json",
            a.body,
        ),
        None => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({
                "error": "unknown API path",
                "paths": ["/api/status", "/api/queue", "/api/sensors", "/api/alerts", "/api/rules"],
            }),
        ),
    }
}

fn denied(d: Denied) -> Res {
    let body = serde_json::json!({ "error": d.to_string() });
    match d {
        Denied::NoUsers => json(StatusCode::FORBIDDEN, &body),
        Denied::NeedCredentials | Denied::BadCredentials => {
            let mut r = json(StatusCode::UNAUTHORIZED, &body);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"edgegate\", charset=\"UTF-8\""),
            );
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

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
        let task = serve(
            listener,
            Routes {
                metrics,
                health,
                web: None,
            },
        );
        // A client that connects and sends nothing.
        let _idle = TcpStream::connect(addr).await.unwrap();
        // HTTP/1.1 without `Connection: close`: answered, and closed, as before.
        let m = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
        assert!(m.contains("edgegate_readings_received_total 1"), "{m}");
        let ok = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.contains("\"healthy\":true"),
            "{ok}"
        );
        healthy.store(false, std::sync::atomic::Ordering::SeqCst);
        // An HTTP/1.0 request gets an HTTP/1.0 answer (the old responder said 1.1).
        let bad = get(addr, "GET /healthz HTTP/1.0\r\n\r\n").await;
        assert!(
            bad.starts_with("HTTP/1.0 503") && bad.contains("queue writer not responding"),
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

    #[tokio::test]
    async fn limits() {
        let health: HealthFn = Arc::new(Vec::new);
        let (listener, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let task = serve(
            listener,
            Routes {
                metrics: Metrics::new(),
                health,
                web: None,
            },
        );
        // A head over the limit is refused (431), not buffered.
        let big = format!(
            "GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(2 * MAX_HEAD)
        );
        let r = get(addr, &big).await;
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
        // A client that sends half a head is cut after READ_TIMEOUT.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(READ_TIMEOUT * 3, s.read_to_end(&mut out)).await;
        assert!(
            t.elapsed() < READ_TIMEOUT * 2,
            "half a head kept the connection open {:?}",
            t.elapsed()
        );
        task.abort();
    }
}
