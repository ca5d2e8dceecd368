//! The guard's in-process connection to rumqttd's router: what stands where a loopback TCP
//! connection to an internal rumqttd listener stood before (issue 15).
//!
//! Why bytes and not packets at this seam: the guard's checks and rewrites (stamps, `$` topics,
//! QoS, No Local, acknowledgement order) work on MQTT frames, tested as such; keeping the seam
//! where the TCP stream was left all of that unchanged, and costs one in-memory copy and one
//! decode per packet (the TCP hop, its syscalls and rumqttd's network layer are gone).
//!
//! Cost, measured (release build, 1,000 readings/s, paired runs on the shared 2-core VM): with
//! no local subscriber no difference within noise (`SCENARIOS=cpu bench/run.sh`: 3.6-7.7 %
//! of a core before, 3.5-8.3 % after); with one local `sensors/#` subscriber 6.3-8.3 % before,
//! 7.4-13.7 % after, with about one more context switch per reading (47,240 against 27,768
//! voluntary switches in one run). The profile shows no hot function here (the adapter and
//! rumqttd's decoder under 1 %); the cost is the extra task hop each way (guard task, adapter
//! task, router thread). Driving `LinkTx`/`LinkRx` from the relay's own task (a packet seam
//! instead of this byte seam) would remove it.
//!
//! [`Router::open`] returns one end of an in-memory byte stream ([`Internal`]); the guard
//! writes MQTT packets into it and reads MQTT packets from it exactly as it did on the TCP
//! connection, so its frame-level checks and rewrites stay where they are. The other end is
//! served by an adapter task of our own (rumqttd's `RemoteLink` does the same over its
//! `Network`, which we no longer use):
//! - the first packet must be a CONNECT: it builds a link with rumqttd's public link API
//!   (`LinkBuilder`: the client id, clean session, the topic alias maximum the guard asked for,
//!   dynamic filters; never a will, which the guard publishes itself, [`Router::publish`]), and
//!   the router's answer goes back as the CONNACK;
//! - every later packet is decoded with rumqttd's own MQTT 3.1.1/5 codec and queued on the
//!   link (`LinkTx`), a burst at a time behind one notification of the router;
//! - the router's notifications (`LinkRx`) are encoded with the same codec and written back;
//!   `Unschedule` (the router paused the link: 200 notifications waiting) is answered with
//!   `wake` once they are written, as `RemoteLink` does.
//!
//! Invariants:
//! - Every link built is ended at the router exactly once: by the client's DISCONNECT the guard
//!   passed on, or by a DISCONNECT of the adapter's own when the guard's end closes (a session
//!   with clean session 0 is then kept by the router, as after a network error), unless the
//!   router ended it first (it drops the link: a newer link with the same client id, a
//!   protocol error). Nothing reports an end twice (rumqttd's network layer could: see
//!   ARCHITECTURE.md, rumqttd failure mode 6, gone with it).
//! - No tokio worker blocks on the router: `LinkTx::send` and `LinkBuilder::build` block when
//!   the router's event channel (1,000 events) is full or the router is busy; a send waits
//!   (asynchronously) until the channel has [`ROOM`] free places, and a build runs on the
//!   blocking pool.
//! - Bounded: at most [`MAX_QUEUED`] packets wait on one link for the router (beyond, the
//!   adapter stops reading the guard's end: backpressure to the client), the stream holds
//!   [`STREAM_BYTES`] each way, and the adapter's own buffers hold one burst (they are given
//!   up after a large packet); a packet queued for the router has an allocation of its own, so
//!   nothing it keeps in its log holds on to a read buffer. Forwarded publishes wait in the router as `Bytes` shared with
//!   its log (no copy) until the adapter encodes them. rumqttd's per-connection `BytesMut`
//!   buffers, which grew to the largest burst and never shrank (issue 12), are not used.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{
    v4::V4, v5::V5, Disconnect, DisconnectReasonCode, Packet, Protocol, Publish,
};
use rumqttd::Notification;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

use crate::broker::frame::{complete_frames, decode, encode, read_frame, BUFFERED_FREE};
use crate::core::metrics::{DropReason, Metrics};

/// The guard's end of its connection to the router.
pub type Internal = DuplexStream;

/// Bytes the in-memory stream holds each way before a writer waits.
pub const STREAM_BYTES: usize = 64 * 1024;

/// Packets that may wait on one link for the router before the adapter stops reading.
pub const MAX_QUEUED: usize = 256;

/// Free places the router's event channel must have before a link notifies it (more than the
/// threads that could notify it at the same moment: the runtime's workers and the gateway's
/// own threads), so that the blocking `send` never blocks.
pub const ROOM: usize = 64;

/// Longest wait for the router to build a link (a CONNECT) or end one.
pub const ROUTER_ANSWER: Duration = Duration::from_secs(5);

/// Packets taken from the guard's end per notification of the router at most.
const BURST: usize = 100;

/// Bytes encoded towards the guard per write at most.
const DOWN_BURST: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkFailure {
    #[error("rumqttd's router did not answer within {0:?}")]
    Timeout(Duration),
    #[error("rumqttd's router refused the link: {0}")]
    Refused(String),
}

type Build =
    dyn Fn(&str, bool, u16) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync;

/// rumqttd's router, as the gateway talks to it. Its event type is private in rumqttd 0.20,
/// so its sender lives only inside these closures.
pub struct Router {
    build: Arc<Build>,
    /// Has the router's event channel [`ROOM`] free places?
    room: Box<dyn Fn() -> bool + Send + Sync>,
    /// The link wills are published on (built on first use).
    wills: tokio::sync::Mutex<Option<(LinkTx, LinkRx)>>,
    max_packet: usize,
    metrics: Arc<Metrics>,
}

impl Router {
    /// Spawn rumqttd's router thread. `max_packet`: the largest packet a link takes.
    pub fn spawn(cfg: rumqttd::RouterConfig, max_packet: usize, metrics: Arc<Metrics>) -> Router {
        let router_tx = rumqttd::Router::new(0, cfg).spawn();
        let tx = router_tx.clone();
        let build: Arc<Build> = Arc::new(move |client_id: &str, clean: bool, aliases: u16| {
            LinkBuilder::new(client_id, tx.clone())
                .clean_session(clean)
                .dynamic_filters(true)
                .topic_alias_max(aliases)
                .build()
                .map_err(|e| e.to_string())
        });
        let room = Box::new(move || {
            router_tx
                .capacity()
                .is_none_or(|c| router_tx.len() + ROOM <= c)
        });
        Router {
            build,
            room,
            wills: tokio::sync::Mutex::new(None),
            max_packet,
            metrics,
        }
    }

    /// A link for the gateway's own use (clean session, QoS 0). Blocks until the router
    /// answered: call it before the listeners open, or on the blocking pool.
    pub fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), LinkFailure> {
        (self.build)(client_id, true, 0)
            .map(|(tx, rx, _)| (tx, rx))
            .map_err(LinkFailure::Refused)
    }

    /// Build a link on the blocking pool, within [`ROUTER_ANSWER`]. A link built after the
    /// caller stopped waiting is ended at once.
    async fn build(
        &self,
        client_id: String,
        clean: bool,
        aliases: u16,
    ) -> Result<(LinkTx, LinkRx, Notification), LinkFailure> {
        let build = self.build.clone();
        let (done, mut answer) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            if let Err(Ok((mut tx, _rx, _))) = done.send(build(&client_id, clean, aliases)) {
                // Nobody waits for it: end it (a blocking send is fine on this thread).
                let _ = ready(tx.send(disconnect()));
            }
        });
        let late = match tokio::time::timeout(ROUTER_ANSWER, &mut answer).await {
            Ok(Ok(Ok(link))) => return Ok(link),
            Ok(Ok(Err(e))) => return Err(LinkFailure::Refused(e)),
            Ok(Err(e)) => return Err(LinkFailure::Refused(e.to_string())),
            Err(_) => {
                answer.close();
                answer.try_recv()
            }
        };
        if let Ok(Ok((mut tx, _, _))) = late {
            // Answered between the timeout and the close.
            self.send(&mut tx, vec![disconnect()]).await;
        }
        Err(LinkFailure::Timeout(ROUTER_ANSWER))
    }

    /// Wait (asynchronously) until the router's event channel has room, then queue `packets`
    /// on `tx` behind one notification. False when the router is gone.
    async fn send(&self, tx: &mut LinkTx, mut packets: Vec<Packet>) -> bool {
        let Some(last) = packets.pop() else {
            return true;
        };
        // A router that does not keep up (minutes, with many filters: issue 12) is polled
        // less and less often, not by every link every millisecond.
        let mut pause = Duration::from_millis(1);
        while !((self.room)() && tx.buffer().len() < MAX_QUEUED) {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        tx.buffer().extend(packets);
        // `LinkTx::send` never awaits: it pushes and notifies the router (a blocking send,
        // which finds room: checked above).
        matches!(ready(tx.send(last)), Some(Ok(_)))
    }

    /// Publish a will (or any message of the guard's own: stamped, QoS 0, `retain` kept) to
    /// rumqttd's local subscribers. Counted as failed (false) when the router cannot take it.
    pub async fn publish(&self, topic: bytes::Bytes, payload: bytes::Bytes, retain: bool) -> bool {
        let mut wills = self.wills.lock().await;
        if wills.is_none() {
            let id = format!(
                "{}wills-{}",
                crate::broker::guard::RESERVED_PREFIX,
                uuid::Uuid::new_v4().simple()
            );
            match self.build(id, true, 0).await {
                Ok((tx, rx, _)) => *wills = Some((tx, rx)),
                Err(e) => {
                    tracing::warn!(error = %e, "no link for wills");
                    return false;
                }
            }
        }
        let Some((tx, _)) = wills.as_mut() else {
            return false;
        };
        let packet = Packet::Publish(Publish::new(topic, payload, retain), None);
        if self.send(tx, vec![packet]).await {
            return true;
        }
        // The router dropped the link (it never does on its own; be safe): next time anew.
        *wills = None;
        false
    }

    /// End the session the router keeps for `client_id` (a clean link replaces it, and is
    /// ended at once).
    pub async fn end_session(&self, client_id: &str) -> Result<(), LinkFailure> {
        let (mut tx, _rx, _) = self.build(client_id.to_string(), true, 0).await?;
        self.send(&mut tx, vec![disconnect()]).await;
        Ok(())
    }

    /// A new connection to the router: the guard's end. The adapter serving the other end runs
    /// until both the guard and the router are done with it.
    pub fn open(self: &Arc<Router>, v5: bool) -> Internal {
        let (guard_end, link_end) = tokio::io::duplex(STREAM_BYTES);
        tokio::spawn(adapter(self.clone(), v5, link_end));
        guard_end
    }
}

fn disconnect() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

/// The output of a future that is ready at its first poll (`LinkTx::send`, which never awaits).
fn ready<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// How the guard's side of a link ended.
enum UpEnd {
    /// The client's DISCONNECT went to the router: it ends the link.
    Disconnected,
    /// The guard's end closed (or sent what does not decode): the adapter ends the link.
    Closed,
    /// The router is gone.
    RouterGone,
}

async fn adapter(router: Arc<Router>, v5: bool, stream: DuplexStream) {
    let max = router.max_packet;
    let (mut r, mut w) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(256);
    let Ok(Some(mut frame)) = read_frame(&mut r, &mut buf, max).await else {
        return;
    };
    let Some(Packet::Connect(connect, props, _will, _will_props, _login)) =
        decode(v5, &mut frame, max)
    else {
        return;
    };
    let aliases = props.and_then(|p| p.topic_alias_max).unwrap_or(0);
    let (mut tx, rx, ack) = match router
        .build(connect.client_id, connect.clean_session, aliases)
        .await
    {
        Ok(link) => link,
        // The guard's end closes without a CONNACK: the guard refuses the client.
        Err(e) => {
            tracing::debug!(error = %e, "link refused");
            return;
        }
    };
    let connack = Option::<Packet>::from(ack).and_then(|p| encode(v5, p));
    let answered = match connack {
        Some(c) => w.write_all(&c).await.is_ok(),
        None => false,
    };
    if !answered {
        router.send(&mut tx, vec![disconnect()]).await;
        return;
    }
    let up = up(&router, &mut r, buf, tx, v5);
    let down = down(&mut w, rx, v5, &router.metrics);
    tokio::pin!(up, down);
    tokio::select! {
        (end, mut tx) = &mut up => {
            if let UpEnd::Closed = end {
                router.send(&mut tx, vec![disconnect()]).await;
            }
            // The router drops the link once it handled the end: the guard's end then reads
            // the close. A guard that is gone makes the writes fail.
            let _ = tokio::time::timeout(ROUTER_ANSWER, &mut down).await;
        }
        gone = &mut down => {
            if gone == DownEnd::GuardGone {
                // The guard let go while its packets still flow: end the link behind them.
                let (_, mut tx) = up.await;
                router.send(&mut tx, vec![disconnect()]).await;
            }
            // RouterGone: the router ended the link (a newer link with the id, a protocol
            // error); the guard reads the close.
        }
    }
}

/// Packets from the guard to the router, a burst behind each notification. Returns the link's
/// sender for its end.
async fn up(
    router: &Router,
    r: &mut ReadHalf<DuplexStream>,
    mut buf: BytesMut,
    mut tx: LinkTx,
    v5: bool,
) -> (UpEnd, LinkTx) {
    let max = router.max_packet;
    loop {
        let mut burst = Vec::new();
        let mut end = None;
        loop {
            match read_frame(r, &mut buf, max).await {
                Ok(Some(f)) => match decode(v5, &mut own(f), max) {
                    Some(p @ Packet::Disconnect(..)) => {
                        burst.push(p);
                        end = Some(UpEnd::Disconnected);
                    }
                    Some(p) => burst.push(p),
                    None => end = Some(UpEnd::Closed),
                },
                _ => end = Some(UpEnd::Closed),
            }
            if end.is_some() || burst.len() >= BURST || complete_frames(&buf, max, 1) == 0 {
                break;
            }
        }
        if !router.send(&mut tx, burst).await {
            return (UpEnd::RouterGone, tx);
        }
        if let Some(end) = end {
            return (end, tx);
        }
    }
}

/// A frame in an allocation of its own: the router's log keeps a publish's bytes, and a small
/// frame is a slice of the read buffer, which it would keep whole. (A large one has its own
/// already: `frame::read_frame` starts a fresh buffer after it.)
fn own(frame: BytesMut) -> BytesMut {
    if frame.len() > BUFFERED_FREE {
        frame
    } else {
        BytesMut::from(&frame[..])
    }
}

#[derive(PartialEq)]
enum DownEnd {
    GuardGone,
    RouterGone,
}

/// Notifications from the router to the guard, encoded a burst at a time.
async fn down(
    w: &mut WriteHalf<DuplexStream>,
    mut rx: LinkRx,
    v5: bool,
    metrics: &Metrics,
) -> DownEnd {
    let mut out = BytesMut::new();
    loop {
        let first = match rx.next().await {
            Ok(n) => n,
            Err(_) => return DownEnd::RouterGone,
        };
        let mut unscheduled = false;
        let mut next = first;
        loop {
            match next {
                Some(Notification::Unschedule) => unscheduled = true,
                Some(n) => {
                    if let Some(p) = Option::<Packet>::from(n) {
                        // rumqttd's MQTT 3.1.1 encoder panics on publish properties (its
                        // failure mode 13): a 3.1.1 client never gets them.
                        let p = match p {
                            Packet::Publish(publish, _) if !v5 => Packet::Publish(publish, None),
                            p => p,
                        };
                        // One that does not encode is not sent (rumqttd's own writer fails the
                        // same way), counted; the bytes of a failed write are never left half
                        // in `out`.
                        let at = out.len();
                        let written = if v5 {
                            V5.write(p, &mut out)
                        } else {
                            V4.write(p, &mut out)
                        };
                        if let Err(e) = written {
                            out.truncate(at);
                            metrics.drop_events(
                                DropReason::SubscriberEncode,
                                1,
                                &format_args!("a message for a local subscriber: {e:?}"),
                            );
                        }
                    }
                }
                None => {}
            }
            if out.len() >= DOWN_BURST {
                break;
            }
            // More already waiting (the link's cache): in the same write.
            match ready(rx.next()) {
                Some(Ok(n)) => next = n,
                Some(Err(_)) => {
                    let _ = w.write_all(&out).await;
                    return DownEnd::RouterGone;
                }
                None => break,
            }
        }
        if !out.is_empty() {
            if w.write_all(&out).await.is_err() {
                return DownEnd::GuardGone;
            }
            out.clear();
            if out.capacity() > 4 * DOWN_BURST {
                out = BytesMut::new();
            }
        }
        if unscheduled && rx.wake().await.is_err() {
            return DownEnd::RouterGone;
        }
    }
}
