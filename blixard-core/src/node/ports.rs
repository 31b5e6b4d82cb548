//! Published ports: the node forwards its TCP `host` port to a VM's
//! `guest` port at the VM's address, in user space (a listener per port, a
//! task per connection copying both ways).
//!
//! User space rather than DNAT rules: it serves connections made from the
//! host itself (including to 127.0.0.1, which DNAT cannot reach without
//! `route_localnet`), leaves no rule behind when the node dies, and needs
//! no firewall tool. What it costs is measured in docs/PERFORMANCE.md (k).
//! The listeners follow the replicated state (`sync`): a VM placed here
//! with published ports gets them, and loses them when it leaves or is
//! deleted.
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// How long a forwarded connection waits for the guest to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One wanted forward: the VM, and where its guest port is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub vm: Arc<str>,
    pub target: SocketAddrV4,
}

struct Listener {
    forward: Forward,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The node's port forwards, by host port.
pub struct PortProxy {
    listeners: Mutex<HashMap<u16, Listener>>,
    /// The address the listeners bind (0.0.0.0 in production).
    bind: Ipv4Addr,
}

impl PortProxy {
    pub fn new(bind: Ipv4Addr) -> Self {
        Self { listeners: Mutex::default(), bind }
    }

    /// Makes the listeners exactly `wanted`: stops those no longer wanted
    /// (or pointing elsewhere), starts the missing ones. Returns the ports
    /// it could not bind, with why (taken by another process, say); they
    /// are tried again at the next sync.
    pub async fn sync(&self, wanted: &BTreeMap<u16, Forward>) -> Vec<(u16, Forward, String)> {
        {
            let mut ls = self.listeners.lock();
            ls.retain(|port, l| wanted.get(port) == Some(&l.forward));
        }
        let mut failed = Vec::new();
        for (&port, fwd) in wanted {
            if self.listeners.lock().contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::from((self.bind, port));
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(port, vm = %fwd.vm, target = %fwd.target, "publishing port");
                    let task = tokio::spawn(serve(listener, fwd.target));
                    self.listeners.lock().insert(port, Listener { forward: fwd.clone(), task });
                }
                Err(e) => failed.push((port, fwd.clone(), e.to_string())),
            }
        }
        failed
    }

    /// The host ports being forwarded now.
    pub fn ports(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self.listeners.lock().keys().copied().collect();
        p.sort_unstable();
        p
    }
}

async fn serve(listener: tokio::net::TcpListener, target: SocketAddrV4) {
    loop {
        let (mut inbound, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or the like: back off, keep serving.
                tracing::warn!(error = %e, "accepting a published-port connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let connect = tokio::net::TcpStream::connect(target);
            let mut outbound = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, %target, error = %e, "the guest refused a published-port connection");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, %target, "the guest did not accept a published-port connection in time");
                    return;
                }
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn forwards_both_ways_and_follows_the_wanted_set() {
        // A stand-in guest: echoes what it reads, upper-cased.
        let guest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(target) = guest.local_addr().unwrap() else { unreachable!() };
        tokio::spawn(async move {
            while let Ok((mut s, _)) = guest.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let proxy = PortProxy::new(Ipv4Addr::LOCALHOST);
        let wanted = BTreeMap::from([(port, Forward { vm: "web".into(), target })]);
        assert!(proxy.sync(&wanted).await.is_empty());
        assert_eq!(proxy.ports(), [port]);
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HELLO");

        // A port taken by someone else is reported, not fatal.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let mut both = wanted.clone();
        both.insert(taken_port, Forward { vm: "db".into(), target });
        let failed = proxy.sync(&both).await;
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, taken_port);

        // Unwanted: the listener goes, new connections are refused.
        assert!(proxy.sync(&BTreeMap::new()).await.is_empty());
        assert!(proxy.ports().is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
    }
}
