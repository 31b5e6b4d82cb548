//! The peer link: AppendEntries over a plain TCP connection per follower.
//!
//! openraft 0.9 replicates to a follower one AppendEntries at a time, so
//! that round trip bounds how fast a write commits (docs/PERFORMANCE.md
//! (c)). Over gRPC each one goes through tonic's channel worker, hyper's
//! connection task and a spawned stream task on both sides, with HTTP/2
//! framing and HPACK around a bincode payload. On the link the leader's
//! replication task writes the request to the socket itself and reads the
//! reply itself; the follower's connection task hands it to openraft and
//! writes the answer. Everything else (votes, snapshots, forwarding) stays on
//! gRPC, which is also where a node learns its peers' link ports
//! (`RaftReply.link_port`) and where AppendEntries go while a link is down.
//!
//! Wire format, both directions: frames of a `u32` little-endian length of
//! what follows, one byte of kind (requests) or status (replies), then the
//! payload. A connection opens with [`MAGIC`] and a [`KIND_HELLO`] frame
//! ([`Hello`]: format version, cluster id, sender); the follower answers
//! [`STATUS_OK`] with its format version, or [`STATUS_REFUSED`] with the
//! reason and closes. Then one request at a time, each answered in order:
//! [`KIND_APPEND`] carries a bincode `AppendEntriesRequest`, its reply the
//! bincode `Result<AppendEntriesResponse, RaftError>` openraft returned.
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
    frame: Vec<u8>,
}

impl Framed {
    pub fn new(io: Box<dyn LinkStream>) -> Self {
        Self { io: BufStream::with_capacity(BUFFER, BUFFER, io), frame: Vec::new() }
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

/// How long a leader waits for a link to connect and say hello back.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a link failed before the next attempt, doubling up to
/// [`MAX_BACKOFF`] while it keeps failing.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why a request on a link produced no reply.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the peer refused the request: {0}")]
    Refused(String),
    #[error("bad reply: {0}")]
    BadReply(String),
}

/// The leader's end of the link to one follower, owned by openraft's
/// replication task for it (one request at a time, as openraft sends them).
/// Connecting happens in a spawned task, never on a request's path: until
/// the link is up, and for a while after it failed, requests go over gRPC.
pub struct LinkClient {
    /// The announced port the state below is for.
    port: u16,
    /// Locked only to take it out or put it back (never across an await):
    /// the simulator's streams are not `Sync`, openraft's clients must be.
    conn: Mutex<Option<Framed>>,
    connecting: Option<oneshot::Receiver<Result<Framed, String>>>,
    retry_at: Option<Instant>,
    failures: u32,
    /// The encoded request, reused.
    buf: Vec<u8>,
}

impl Default for LinkClient {
    fn default() -> Self {
        Self {
            port: 0,
            conn: Mutex::new(None),
            connecting: None,
            retry_at: None,
            failures: 0,
            buf: Vec::new(),
        }
    }
}

impl LinkClient {
    /// Sends one request on the link and decodes its reply, if the link is
    /// up; `None` when it is not (yet): the caller uses gRPC. `target` and
    /// `addr` (its gRPC address) name the peer, `announced` is its link port
    /// (see [`super::network::PeerChannels::link_port`]). A request that
    /// fails on the link is reported as such; the connection is dropped and
    /// the next attempt waits out a backoff. Dropping the returned future
    /// mid-request drops the connection with it, never leaving it half read.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        target: NodeId,
        addr: &str,
        announced: Option<u16>,
        hello: impl FnOnce() -> Hello,
        kind: u8,
        req: &Req,
    ) -> Option<Result<Resp, LinkError>> {
        let mut conn = self.ready(target, addr, announced, hello)?;
        self.buf.clear();
        if let Err(e) = crate::codec::encode_into(req, &mut self.buf) {
            *self.conn.get_mut() = Some(conn);
            return Some(Err(LinkError::BadReply(format!("cannot encode the request: {e}"))));
        }
        let out = exchange(&mut conn, kind, &self.buf).await;
        match &out {
            Ok(_) => *self.conn.get_mut() = Some(conn),
            Err(e) => self.failed(target, addr, &e.to_string()),
        }
        Some(out)
    }

    /// Notes that the link failed (a request timed out on it, say): the
    /// connection is gone and the next attempt waits.
    pub fn failed(&mut self, target: NodeId, addr: &str, why: &str) {
        *self.conn.get_mut() = None;
        self.connecting = None;
        self.failures += 1;
        let backoff =
            FIRST_BACKOFF.saturating_mul(1 << self.failures.min(6).saturating_sub(1)).min(MAX_BACKOFF);
        self.retry_at = Some(Instant::now() + backoff);
        if self.failures == 1 {
            tracing::warn!(target, %addr, port = self.port, reason = %why, ?backoff, "peer link down: AppendEntries go over gRPC until it is back");
        } else {
            tracing::debug!(target, %addr, port = self.port, reason = %why, ?backoff, "peer link still down");
        }
    }

    /// The connection, if up; otherwise starts connecting (unless waiting
    /// after a failure).
    fn ready(
        &mut self,
        target: NodeId,
        addr: &str,
        announced: Option<u16>,
        hello: impl FnOnce() -> Hello,
    ) -> Option<Framed> {
        let Some(port) = announced else {
            // The peer has no link (any more): forget ours.
            if self.port != 0 {
                *self = Self { buf: std::mem::take(&mut self.buf), ..Self::default() };
            }
            return None;
        };
        if port != self.port {
            // A new port (the peer restarted): start over at once.
            *self = Self { port, buf: std::mem::take(&mut self.buf), ..Self::default() };
        }
        if let Some(c) = self.conn.get_mut().take() {
            return Some(c);
        }
        if let Some(rx) = &mut self.connecting {
            match rx.try_recv() {
                Ok(Ok(conn)) => {
                    self.connecting = None;
                    if self.failures > 0 {
                        tracing::info!(target, %addr, port, "peer link up again");
                    }
                    self.failures = 0;
                    self.retry_at = None;
                    return Some(conn);
                }
                Ok(Err(why)) => self.failed(target, addr, &why),
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => self.connecting = None,
            }
            return None;
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let at = link_addr(addr, port)?;
        self.connecting = Some(connect(at, hello()));
        None
    }
}

/// Sends one request and reads its reply.
async fn exchange<Resp: DeserializeOwned>(
    conn: &mut Framed,
    kind: u8,
    payload: &[u8],
) -> Result<Resp, LinkError> {
    conn.send(kind, payload).await?;
    match conn.recv().await? {
        Some((STATUS_OK, reply)) => {
            crate::codec::decode(reply).map_err(|e| LinkError::BadReply(e.to_string()))
        }
        Some((STATUS_REFUSED, reason)) => {
            Err(LinkError::Refused(String::from_utf8_lossy(reason).into_owned()))
        }
        Some((status, _)) => Err(LinkError::BadReply(format!("unknown reply status {status}"))),
        None => Err(LinkError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the link"))),
    }
}

/// Dials `at` in a task of its own and says hello; the receiver gets the
/// connection once the peer accepted it, or why not.
fn connect(at: String, hello: Hello) -> oneshot::Receiver<Result<Framed, String>> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let dial = async {
            let stream = tokio::net::TcpStream::connect(at.as_str()).await.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            let mut conn = Framed::new(Box::new(stream));
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

    #[test]
    fn link_addresses_keep_the_host_and_take_the_port() {
        assert_eq!(link_addr("10.0.0.2:7420", 41000).as_deref(), Some("10.0.0.2:41000"));
        assert_eq!(link_addr("[::1]:7420", 9).as_deref(), Some("[::1]:9"));
        assert_eq!(link_addr("node-2.example:7420", 9).as_deref(), Some("node-2.example:9"));
        assert_eq!(link_addr("10.0.0.2:7420", 0), None);
        assert_eq!(link_addr("nohost", 9), None);
    }
}
