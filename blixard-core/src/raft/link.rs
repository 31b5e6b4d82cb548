//! The peer link: Raft's hot requests over plain TCP connections.
//!
//! openraft 0.9 replicates to a follower one AppendEntries at a time, so
//! that round trip bounds how fast a write commits (docs/PERFORMANCE.md
//! (c)). Over gRPC each one goes through tonic's channel worker, hyper's
//! connection task and a spawned stream task on both sides, with HTTP/2
//! framing and HPACK around a bincode payload. On the link the leader's
//! replication task writes the request to the socket itself and reads the
//! reply itself; the follower's connection task hands it to openraft and
//! writes the answer. A follower's forwarded client writes (node/forwarder.rs)
//! go to the leader the same way. Everything else (votes, snapshots, reads,
//! liveness) stays on gRPC, which is also where a node learns its peers'
//! link ports (`RaftReply.link_port`) and where requests go while a link is
//! down.
//!
//! Wire format, both directions: frames of a `u32` little-endian length of
//! what follows, one byte of kind (requests) or status (replies), then the
//! payload. A connection opens with [`MAGIC`] and a [`KIND_HELLO`] frame
//! ([`Hello`]: format version, cluster id, sender); the accepting node
//! answers [`STATUS_OK`] with its format version, or [`STATUS_REFUSED`]
//! with the reason and closes. Then one request at a time, each answered in
//! order: [`KIND_APPEND`] carries a bincode `AppendEntriesRequest`, its
//! reply the bincode `Result<AppendEntriesResponse, RaftError>` openraft
//! returned; [`KIND_FORWARD`] carries a bincode `LinkForward` (a
//! `ProposeBatch` with its caller's token and trace context), its reply a
//! `LinkForwardReply`. A request the node does not know or cannot decode
//! is refused before anything is done with it, and the connection closes.
//! Under madsim the same code runs over the simulator's TCP.
use std::io;
use std::time::Duration;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::types::NodeId;

/// First bytes a link connection carries: anything else is not a peer.
pub const MAGIC: &[u8; 8] = b"BLXLINK1";
/// The opening frame: a bincode [`Hello`].
pub const KIND_HELLO: u8 = 0;
/// A bincode `AppendEntriesRequest`.
pub const KIND_APPEND: u8 = 1;
/// Client writes a follower forwards to the leader: a bincode
/// `node::forwarder::LinkForward`.
pub const KIND_FORWARD: u8 = 2;
/// The request was handled; the payload is its reply.
pub const STATUS_OK: u8 = 0;
/// The request was refused (wrong cluster, a newer format, a bad payload);
/// the payload is the reason as UTF-8 and the connection closes.
pub const STATUS_REFUSED: u8 = 1;

/// Largest frame either side accepts: the gRPC path's message limit.
pub const MAX_FRAME: usize = super::network::MAX_MESSAGE_BYTES;
/// Read and write buffers of a connection: one AppendEntries of a busy
/// leader fits, a larger one goes through unbuffered.
const BUFFER: usize = 64 * 1024;

/// The sender's introduction, checked like a gRPC `RaftRequest`'s envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub format: u16,
    pub cluster_id: String,
    pub from: NodeId,
}

/// A byte stream a link runs over (a TCP stream; the simulator's too).
pub trait LinkStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> LinkStream for T {}

/// One end of a link: buffered both ways, with a frame buffer reused for
/// every message.
pub struct Framed {
    io: BufStream<Box<dyn LinkStream>>,
    /// The last frame read.
    frame: Vec<u8>,
    /// The message being written, encoded.
    out: Vec<u8>,
}

impl Framed {
    pub fn new(io: Box<dyn LinkStream>) -> Self {
        Self { io: BufStream::with_capacity(BUFFER, BUFFER, io), frame: Vec::new(), out: Vec::new() }
    }

    /// Encodes `msg` (bincode) into the connection's reused buffer and
    /// sends it as one frame.
    pub async fn send_encoded<T: Serialize>(&mut self, tag: u8, msg: &T) -> Result<(), LinkError> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let sent = match crate::codec::encode_into(msg, &mut out) {
            Ok(_) if out.len() + 1 > MAX_FRAME => Err(LinkError::NotSent(format!(
                "a frame of {} bytes exceeds the {MAX_FRAME}-byte limit",
                out.len() + 1
            ))),
            Ok(_) => self.send(tag, &out).await.map_err(LinkError::from),
            Err(e) => Err(LinkError::NotSent(e.to_string())),
        };
        self.out = out;
        sent
    }

    /// Sends one request and reads its reply.
    pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        kind: u8,
        req: &Req,
    ) -> Result<Resp, LinkError> {
        self.send_encoded(kind, req).await?;
        match self.recv().await? {
            Some((STATUS_OK, reply)) => {
                crate::codec::decode(reply).map_err(|e| LinkError::BadReply(e.to_string()))
            }
            Some((STATUS_REFUSED, reason)) => {
                Err(LinkError::Refused(String::from_utf8_lossy(reason).into_owned()))
            }
            Some((status, _)) => Err(LinkError::BadReply(format!("unknown reply status {status}"))),
            None => {
                Err(LinkError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the link")))
            }
        }
    }

    /// Writes one frame and flushes it: one `write` for a frame that fits
    /// the buffer.
    pub async fn send(&mut self, tag: u8, payload: &[u8]) -> io::Result<()> {
        if payload.len() + 1 > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a frame of {} bytes exceeds the {MAX_FRAME}-byte limit", payload.len() + 1),
            ));
        }
        let len = (payload.len() + 1) as u32;
        self.io.write_all(&len.to_le_bytes()).await?;
        self.io.write_all(&[tag]).await?;
        self.io.write_all(payload).await?;
        self.io.flush().await
    }

    /// Reads one frame: its tag and payload (valid until the next call).
    /// `Ok(None)` when the other end closed the connection between frames.
    pub async fn recv(&mut self) -> io::Result<Option<(u8, &[u8])>> {
        let mut len = [0u8; 4];
        match self.io.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a frame of {len} bytes (1 to {MAX_FRAME} allowed)"),
            ));
        }
        self.frame.resize(len, 0);
        self.io.read_exact(&mut self.frame).await?;
        Ok(Some((self.frame[0], &self.frame[1..])))
    }

    /// Writes the connection's opening bytes and hello.
    pub async fn open(&mut self, hello: &Hello) -> io::Result<()> {
        let payload =
            crate::codec::encode(hello).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.io.write_all(MAGIC).await?;
        self.send(KIND_HELLO, &payload).await
    }

    /// Reads the opening bytes and hello of an accepted connection.
    pub async fn accept(&mut self) -> io::Result<Hello> {
        let mut magic = [0u8; MAGIC.len()];
        self.io.read_exact(&mut magic).await?;
        if &magic != MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a Blixard peer link"));
        }
        match self.recv().await? {
            Some((KIND_HELLO, payload)) => crate::codec::decode(payload)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad hello: {e}"))),
            Some((kind, _)) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected a hello, got a frame of kind {kind}"),
            )),
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before its hello")),
        }
    }
}

/// How long a link may take to connect (and shake hands) and say hello back.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a link failed before the next attempt, doubling up to
/// [`MAX_BACKOFF`] while it keeps failing.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Idle connections kept per peer: as many as requests ran at once, up to
/// this (one for AppendEntries, a few for forwards in flight together).
const MAX_IDLE: usize = 4;
/// An idle connection older than this is closed rather than used: the
/// peer closes one that carried nothing for its `IDLE_TIMEOUT` (30 s), and
/// a request must not find that out.
const IDLE_REUSE: Duration = Duration::from_secs(20);

/// Why a request on a link produced no reply.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The request was not sent: it could not be encoded, or it exceeds
    /// the frame limit. The connection is as it was.
    #[error("request not sent: {0}")]
    NotSent(String),
    #[error("the peer refused the request: {0}")]
    Refused(String),
    #[error("bad reply: {0}")]
    BadReply(String),
}

/// This node's links to one peer, shared by everything that sends it
/// requests: openraft's replication task while this node leads, the
/// forwarder while the peer does ([`super::network::PeerChannels::link`]).
/// A request takes an idle connection and puts it back once answered, so a
/// connection carries one request at a time. With none idle the request
/// goes over gRPC while a connection is opened in a task of its own:
/// nothing dials on a request's path, and there are as many connections as
/// requests ever ran at once (up to [`MAX_IDLE`] kept). After a failure
/// the next connection waits out a backoff, and requests use gRPC.
#[derive(Default)]
pub struct Link {
    /// Locked only to take or put back a connection (never across an
    /// await); the simulator's streams are `Send` but not `Sync`.
    state: Mutex<LinkState>,
    dialer: Dialer,
}

/// How a node dials its peers' links: in plaintext (a cluster without
/// TLS), with mutual TLS (node certificates of the cluster's CA, the
/// peer's checked against the host it is dialled at, as gRPC's are), or
/// not at all (a TLS cluster whose link configuration could not be built:
/// everything goes over gRPC rather than in the clear).
#[derive(Clone, Default)]
pub enum Dialer {
    #[default]
    Plain,
    #[cfg(not(madsim))]
    Tls(tokio_rustls::TlsConnector),
    Off,
}

impl Dialer {
    /// Whether connections are TLS with node certificates on both ends: a
    /// forward may then carry a certificate caller's claim (auth.rs).
    pub fn authenticated(&self) -> bool {
        match self {
            #[cfg(not(madsim))]
            Dialer::Tls(_) => true,
            _ => false,
        }
    }

    /// Wraps a connected stream as this dialer does.
    async fn wrap(&self, at: &str, stream: tokio::net::TcpStream) -> Result<Box<dyn LinkStream>, String> {
        #[cfg(madsim)]
        let _ = at;
        match self {
            Dialer::Plain => Ok(Box::new(stream)),
            #[cfg(not(madsim))]
            Dialer::Tls(tls) => {
                let host = at.rsplit_once(':').map_or(at, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = rustls_pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| format!("cannot verify {host:?}: {e}"))?;
                let s = tls.connect(name, stream).await.map_err(|e| format!("TLS handshake: {e}"))?;
                Ok(Box::new(s))
            }
            Dialer::Off => Err("no peer link without its TLS configuration".into()),
        }
    }
}

#[derive(Default)]
struct LinkState {
    /// The announced port the state below is for.
    port: u16,
    /// Idle connections with when each was last used, oldest first.
    idle: Vec<(Framed, Instant)>,
    connecting: Option<oneshot::Receiver<Result<Framed, String>>>,
    retry_at: Option<Instant>,
    failures: u32,
}

impl Link {
    /// Links to a peer, dialled by `dialer`.
    pub fn new(dialer: Dialer) -> Self {
        Self { state: Mutex::default(), dialer }
    }

    /// How this link dials.
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// Sends one request on the link and decodes its reply, if the link is
    /// up; `None` when it is not (yet): the caller uses gRPC. `addr` (its
    /// gRPC address) names the peer, `announced` is its link port
    /// (see [`super::network::PeerChannels::link_port`]). A request that
    /// fails on the link is reported as such; its connection is closed and
    /// the next one waits out a backoff. Dropping the returned future
    /// mid-request closes its connection, never leaving it half read.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        announced: Option<u16>,
        hello: impl FnOnce() -> Hello,
        kind: u8,
        req: &Req,
    ) -> Option<Result<Resp, LinkError>> {
        let (mut conn, port) = self.take(addr, announced, hello)?;
        let out = conn.request(kind, req).await;
        match &out {
            // Nothing was sent on it: the connection is as it was.
            Ok(_) | Err(LinkError::NotSent(_)) => {
                let mut s = self.state.lock();
                if s.port == port && s.idle.len() < MAX_IDLE {
                    s.idle.push((conn, Instant::now()));
                }
            }
            Err(e) => self.failed(addr, &e.to_string()),
        }
        Some(out)
    }

    /// Notes that the link failed (a request timed out on it, say): its
    /// idle connections are closed and the next attempt waits.
    pub fn failed(&self, addr: &str, why: &str) {
        self.state.lock().failed(addr, why);
    }

    /// An idle connection and the port it is for, if there is one;
    /// otherwise starts connecting (unless waiting after a failure).
    fn take(
        &self,
        addr: &str,
        announced: Option<u16>,
        hello: impl FnOnce() -> Hello,
    ) -> Option<(Framed, u16)> {
        let mut s = self.state.lock();
        let Some(port) = announced else {
            // The peer has no link (any more): forget ours.
            if s.port != 0 {
                *s = LinkState::default();
            }
            return None;
        };
        if port != s.port {
            // A new port (the peer restarted): start over at once.
            *s = LinkState { port, ..LinkState::default() };
        }
        if let Some((conn, used)) = s.idle.pop() {
            if used.elapsed() < IDLE_REUSE {
                return Some((conn, port));
            }
            // It and every older one may be closed by now.
            s.idle.clear();
        }
        if let Some(rx) = &mut s.connecting {
            match rx.try_recv() {
                Ok(Ok(conn)) => {
                    s.connecting = None;
                    if s.failures > 0 {
                        tracing::info!(peer = %addr, port, "peer link up again");
                    }
                    s.failures = 0;
                    s.retry_at = None;
                    return Some((conn, port));
                }
                Ok(Err(why)) => s.failed(addr, &why),
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => s.connecting = None,
            }
            return None;
        }
        if s.retry_at.is_some_and(|t| Instant::now() < t) || matches!(self.dialer, Dialer::Off) {
            return None;
        }
        let at = link_addr(addr, port)?;
        s.connecting = Some(connect(at, hello(), self.dialer.clone()));
        None
    }
}

impl LinkState {
    fn failed(&mut self, addr: &str, why: &str) {
        self.idle.clear();
        self.connecting = None;
        self.failures += 1;
        let backoff =
            FIRST_BACKOFF.saturating_mul(1 << self.failures.min(6).saturating_sub(1)).min(MAX_BACKOFF);
        self.retry_at = Some(Instant::now() + backoff);
        if self.failures == 1 {
            tracing::warn!(peer = %addr, port = self.port, reason = %why, ?backoff, "peer link down: requests to this peer go over gRPC until it is back");
        } else {
            tracing::debug!(peer = %addr, port = self.port, reason = %why, ?backoff, "peer link still down");
        }
    }
}

/// Dials `at` in a task of its own and says hello; the receiver gets the
/// connection once the peer accepted it, or why not.
fn connect(at: String, hello: Hello, dialer: Dialer) -> oneshot::Receiver<Result<Framed, String>> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let dial = async {
            let stream = tokio::net::TcpStream::connect(at.as_str()).await.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            let mut conn = Framed::new(dialer.wrap(&at, stream).await?);
            conn.open(&hello).await.map_err(|e| e.to_string())?;
            match conn.recv().await.map_err(|e| e.to_string())? {
                Some((STATUS_OK, p)) => {
                    let version: u16 =
                        crate::codec::decode(p).map_err(|e| format!("bad hello reply: {e}"))?;
                    crate::format::check(&format!("the peer link of {at}"), version)
                        .map_err(|e| e.to_string())?;
                }
                Some((STATUS_REFUSED, reason)) => {
                    return Err(format!("refused: {}", String::from_utf8_lossy(reason)))
                }
                Some((status, _)) => return Err(format!("unknown reply status {status}")),
                None => return Err("closed before saying hello".to_string()),
            }
            Ok(conn)
        };
        let out = tokio::time::timeout(CONNECT_TIMEOUT, dial)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {CONNECT_TIMEOUT:?}")));
        let _ = tx.send(out);
    });
    rx
}

/// The address of a peer's link: its advertised gRPC address's host with
/// the link port it announced.
pub fn link_addr(grpc_addr: &str, port: u16) -> Option<String> {
    let (host, _) = grpc_addr.rsplit_once(':')?;
    (!host.is_empty() && port != 0).then(|| format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn pair() -> (Framed, Framed) {
        let (a, b) = tokio::io::duplex(1024);
        (Framed::new(Box::new(a)), Framed::new(Box::new(b)))
    }

    #[tokio::test]
    async fn frames_cross_in_order_whatever_their_size() {
        let (mut a, mut b) = pair();
        let big = vec![7u8; 300_000];
        let writer = tokio::spawn(async move {
            a.send(KIND_APPEND, b"one").await.unwrap();
            a.send(KIND_APPEND, &big).await.unwrap();
            a.send(STATUS_OK, b"").await.unwrap();
            a
        });
        let (k, p) = b.recv().await.unwrap().unwrap();
        assert_eq!((k, p), (KIND_APPEND, &b"one"[..]));
        let (k, p) = b.recv().await.unwrap().unwrap();
        assert_eq!((k, p.len(), p[299_999]), (KIND_APPEND, 300_000, 7));
        let (k, p) = b.recv().await.unwrap().unwrap();
        assert_eq!((k, p.len()), (STATUS_OK, 0));
        drop(writer.await.unwrap());
        assert!(b.recv().await.unwrap().is_none(), "a closed connection between frames is the end");
    }

    #[tokio::test]
    async fn a_hello_opens_and_anything_else_is_refused() {
        let (mut a, mut b) = pair();
        let hello = Hello { format: crate::format::CURRENT, cluster_id: "c-1".into(), from: 3 };
        a.open(&hello).await.unwrap();
        assert_eq!(b.accept().await.unwrap(), hello);

        let (mut a, mut b) = pair();
        a.io.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        a.io.flush().await.unwrap();
        let e = b.accept().await.unwrap_err();
        assert!(e.to_string().contains("not a Blixard peer link"), "{e}");

        let (mut a, mut b) = pair();
        a.io.write_all(MAGIC).await.unwrap();
        a.send(KIND_APPEND, b"x").await.unwrap();
        let e = b.accept().await.unwrap_err();
        assert!(e.to_string().contains("expected a hello"), "{e}");
    }

    #[tokio::test]
    async fn oversized_and_empty_frames_are_errors_not_allocations() {
        let (mut a, mut b) = pair();
        a.io.write_all(&(u32::MAX).to_le_bytes()).await.unwrap();
        a.io.flush().await.unwrap();
        assert_eq!(b.recv().await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let (mut a, mut b) = pair();
        a.io.write_all(&0u32.to_le_bytes()).await.unwrap();
        a.io.flush().await.unwrap();
        assert_eq!(b.recv().await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let too_big = vec![0u8; MAX_FRAME];
        assert_eq!(a.send(KIND_APPEND, &too_big).await.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    /// A peer that answers each request with its `u32` payload plus one;
    /// requests of kind 9 wait for `gate` first (counted in `waiting`).
    /// Counts its connections in `accepted`.
    async fn peer(
        gate: Arc<tokio::sync::Notify>,
        waiting: Arc<AtomicUsize>,
        accepted: Arc<AtomicUsize>,
    ) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                accepted.fetch_add(1, Ordering::SeqCst);
                let (gate, waiting) = (gate.clone(), waiting.clone());
                conns.push(AbortOnDrop(tokio::spawn(async move {
                    let mut link = Framed::new(Box::new(stream));
                    link.accept().await.unwrap();
                    link.send_encoded(STATUS_OK, &crate::format::CURRENT).await.unwrap();
                    while let Ok(Some((kind, payload))) = link.recv().await {
                        let n: u32 = crate::codec::decode(payload).unwrap();
                        if kind == 9 {
                            waiting.fetch_add(1, Ordering::SeqCst);
                            gate.notified().await;
                        }
                        if link.send_encoded(STATUS_OK, &(n + 1)).await.is_err() {
                            return;
                        }
                    }
                })));
            }
        });
        (port, task)
    }

    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    fn hello() -> Hello {
        Hello { format: crate::format::CURRENT, cluster_id: "c-1".into(), from: 1 }
    }

    /// Calls until the link is up (the first calls start connecting and
    /// answer `None`).
    async fn call_when_up(link: &Link, port: u16, kind: u8, n: u32) -> u32 {
        for _ in 0..500 {
            if let Some(out) = link.call::<u32, u32>("127.0.0.1:1", Some(port), hello, kind, &n).await {
                return out.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the link never came up");
    }

    #[tokio::test]
    async fn a_link_keeps_a_connection_per_request_in_flight_and_dials_off_the_request_path() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let accepted = Arc::new(AtomicUsize::new(0));
        let gate_waiters = Arc::new(AtomicUsize::new(0));
        let (port, server) = peer(gate.clone(), gate_waiters.clone(), accepted.clone()).await;
        let link = Arc::new(Link::default());
        let call = |kind: u8, n: u32| {
            let link = link.clone();
            async move { link.call::<u32, u32>("127.0.0.1:1", Some(port), hello, kind, &n).await }
        };
        assert!(call(1, 1).await.is_none(), "the first request goes elsewhere while the link connects");
        assert_eq!(call_when_up(&link, port, 1, 1).await, 2);
        for n in 0..10 {
            assert_eq!(call(1, n).await.unwrap().unwrap(), n + 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one request at a time needs one connection");

        // A request held by the peer keeps its connection: the next one goes
        // elsewhere while a second connection opens, then uses it.
        let held = tokio::spawn(call(9, 100));
        while gate_waiters.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(call(1, 0).await.is_none(), "no idle connection, yet an answer");
        assert_eq!(call_when_up(&link, port, 1, 5).await, 6);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        gate.notify_one();
        assert_eq!(held.await.unwrap().unwrap().unwrap(), 101);
        // Both are kept and reused.
        let (a, b) = tokio::join!(call(1, 7), call(1, 8));
        assert_eq!((a.unwrap().unwrap(), b.unwrap().unwrap()), (8, 9));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // The peer goes away: the request in flight fails, and the next
        // ones go elsewhere (no dialling) until the backoff is over.
        server.abort();
        let _ = server.await;
        let failed = call(1, 1).await.expect("an idle connection was there");
        assert!(failed.is_err(), "a dead peer answered: {failed:?}");
        for _ in 0..3 {
            assert!(call(1, 1).await.is_none());
        }
        assert!(link.state.lock().connecting.is_none(), "dialled during the backoff");
    }

    #[test]
    fn link_addresses_keep_the_host_and_take_the_port() {
        assert_eq!(link_addr("10.0.0.2:7420", 41000).as_deref(), Some("10.0.0.2:41000"));
        assert_eq!(link_addr("[::1]:7420", 9).as_deref(), Some("[::1]:9"));
        assert_eq!(link_addr("node-2.example:7420", 9).as_deref(), Some("node-2.example:9"));
        assert_eq!(link_addr("10.0.0.2:7420", 0), None);
        assert_eq!(link_addr("nohost", 9), None);
    }
}
