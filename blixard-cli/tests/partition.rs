//! A follower cut off from the network and healed again must not cost the
//! cluster its leader: real `blixard` processes, each in its own network
//! namespace, the follower isolated with iptables DROP (packets vanish, as
//! on a cut cable).
//!
//! Without pre-vote the isolated follower would time out, raise its term
//! with every election it starts alone, and on healing its higher term would
//! make the healthy leader step down. So each trial checks, besides the
//! leader id, that the term never moved: not on the isolated node while it
//! was cut off, and nowhere after the heal. Then the leader itself is cut
//! off, and the other two must elect a new one: stability must not come
//! from a cluster that never campaigns.
//!
//! Needs root, iproute2 and iptables; fails (never skips) without them.
use std::thread::sleep;
use std::time::{Duration, Instant};

mod common;
use common::netns::{poll, NsCluster};
use common::BIN;

#[test]
fn an_isolated_follower_rejoins_without_a_leader_change() {
    let mut c = NsCluster::start(BIN, 3, "info,openraft=warn,blixard_core::node::election=debug");
    let (leader, term) = c.wait_formed(90.0);
    for k in 0..5 {
        let out = c.write(leader, &format!("warm-{k}"));
        assert!(out.status.success(), "write before the trials: {}", String::from_utf8_lossy(&out.stderr));
    }

    // Cut lengths: a few leases (0.8 s each), then long enough for the
    // HTTP/2 keepalives to declare the leader's connection dead.
    for (trial, cut_secs) in [3u64, 6, 10].into_iter().enumerate() {
        let followers: Vec<usize> = (0..c.len()).filter(|i| *i != leader).collect();
        let f = followers[trial % followers.len()];
        let (l, t) = c.agreed().expect("all nodes agree on a leader before the trial");
        assert_eq!((l, t), (leader, term), "trial {trial}: leader or term moved between trials");
        eprintln!(
            "trial {trial}: isolating node {} for {cut_secs}s (leader node {}, term {term})",
            f + 1,
            leader + 1
        );

        c.net.isolate(f);
        let cut = Instant::now();
        // The majority keeps serving writes (on every other trial; an idle
        // cluster is the other case: the cut-off node's log stays current,
        // so only leader stickiness keeps it from winning a vote).
        let mut written = 0;
        while cut.elapsed() < Duration::from_secs(cut_secs) {
            if trial % 2 == 0 {
                let name = format!("cut-{trial}-{written}");
                let out = c.write(leader, &name);
                assert!(
                    out.status.success(),
                    "trial {trial}: write through the leader while node {} is cut off: {}",
                    f + 1,
                    String::from_utf8_lossy(&out.stderr)
                );
                written += 1;
            }
            sleep(Duration::from_millis(200));
        }
        // Read over the node's own loopback: it never raised its term.
        let alone = c.status(f).expect("the isolated node answers locally");
        assert_eq!(alone.term, term, "trial {trial}: node {} raised its term while cut off", f + 1);
        c.net.heal(f);

        // A disruptive election would happen within one heartbeat reply of
        // the heal; give it several leases.
        sleep(Duration::from_secs(3));
        for i in 0..c.len() {
            let s = c.status(i).unwrap_or_else(|| panic!("node {} answers", i + 1));
            assert_eq!(
                (s.leader, s.term),
                (Some(leader as u64 + 1), term),
                "trial {trial}: node {} reports another leader or term after node {} was healed",
                i + 1,
                f + 1
            );
        }

        // The healed node catches up to the leader's applied index...
        let target = c.status(leader).unwrap().applied;
        poll(10.0, || (c.status(f)?.applied >= target).then_some(())).unwrap_or_else(|| {
            panic!("trial {trial}: node {} did not catch up to applied index {target}", f + 1)
        });
        // ...and serves writes again.
        let out = c.write(f, &format!("healed-{trial}"));
        assert!(
            out.status.success(),
            "trial {trial}: write through healed node {}: {}",
            f + 1,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(c.agreed(), Some((leader, term)), "trial {trial}: leader or term changed after the write");
        eprintln!("trial {trial}: ok ({written} writes during the cut)");
    }

    // The other side: elections still happen when they should (a cluster
    // that never campaigns would pass every trial above). Cut off the
    // leader: the two others elect one of themselves and serve writes.
    let old = leader;
    let other = (0..c.len()).find(|i| *i != old).unwrap();
    c.net.isolate(old);
    let cut = Instant::now();
    let out = c.write(other, "leader-cut-off");
    assert!(
        out.status.success(),
        "write through node {} with leader node {} cut off: {}",
        other + 1,
        old + 1,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("leader node {} cut off: a write through node {} took {:?}", old + 1, other + 1, cut.elapsed());
    let (new_leader, new_term) =
        c.status(other).and_then(|s| Some((s.leader? as usize - 1, s.term))).unwrap();
    assert!(new_leader != old && new_term > term, "node {} still follows node {}", other + 1, old + 1);
    // Healed, the old leader learns the newer term and follows.
    c.net.heal(old);
    poll(15.0, || (c.agreed()? == (new_leader, new_term)).then_some(()))
        .unwrap_or_else(|| panic!("node {} did not follow the new leader node {}", old + 1, new_leader + 1));
    let target = c.status(new_leader).unwrap().applied;
    poll(10.0, || (c.status(old)?.applied >= target).then_some(()))
        .unwrap_or_else(|| panic!("node {} did not catch up after its partition", old + 1));
}
