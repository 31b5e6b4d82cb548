//! Helpers for tests that start real nodes (this crate's integration tests
//! and the CLI's). Nothing here runs in a node.

use std::net::TcpListener;

/// A loopback port nobody listens on right now, for a node to listen on
/// later. Taken from below the kernel's ephemeral range: a port the kernel
/// hands out itself (a peer link's or metrics listener on port 0, the local
/// end of any connection) could otherwise be taken between this call and
/// the node's bind, and the node would fail to start. Ports are walked from
/// an offset drawn from the process id, so concurrent test processes rarely
/// meet, four apart (a test that runs `up --base-port P` takes P+1 and P+2
/// too), and each is checked free before it is handed out.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(FIRST);
    if span < 1_000 {
        // No room below the ephemeral range: let the kernel pick.
        return TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    }
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span / 4 {
        let port = FIRST + (start + 4 * NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free loopback port in {FIRST}..{ephemeral}");
}
