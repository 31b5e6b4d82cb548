//! The dedup window: the results of the last [`DEDUP_WINDOW`] identified
//! requests, so that a retried write gets its first outcome instead of
//! being applied twice.
//!
//! Part of the replicated state (every replica keeps the same window, in
//! apply order, and snapshots carry it), so eviction is by count, never by
//! clock.
//!
//! Its memory is fixed when it is made and never grows: a ring of
//! [`DEDUP_WINDOW`] slots (id and encoded result, 48 bytes each) and an
//! index of ring positions twice that size (8 bytes a slot: the position
//! and the id's hash, so a probe rarely reads the ring). A general hash
//! map cannot promise that under this workload: every write inserts one id
//! and evicts another, the deletions leave tombstones, and when they use up
//! the table's slack a table more than half full doubles. A node's memory
//! rose by 6 MiB in one step, far into a long run, when that happened
//! (docs/PERFORMANCE.md (c)). The index here is open addressing with linear
//! probing, at most half full, and a deletion moves the rest of its probe
//! run back instead of leaving a tombstone: no rehash, ever.
use std::hash::{BuildHasher, RandomState};

use crate::codec;
use crate::command::{CommandResult, RequestId};

/// How many recent request results are remembered for deduplication: the
/// last 65,536 identified writes (successes and rejections), in log order.
/// A retry arrives within seconds; at the highest write rates measured
/// (about 25,000 writes/s) the window spans a few seconds, at a control
/// plane's usual rates hours. Evicting by count keeps memory bounded and
/// apply deterministic (no clock).
pub const DEDUP_WINDOW: usize = 65_536;

/// Index slots: a power of two, twice the window, so the index is never
/// more than half full (short probe runs).
const INDEX_SLOTS: usize = 2 * DEDUP_WINDOW;
/// An index slot is `hash & !POS | (position + 1)`; 0 is an empty slot.
const POS_BITS: u32 = 20;
const POS: u64 = (1 << POS_BITS) - 1;
const _: () = assert!(INDEX_SLOTS.is_power_of_two() && (DEDUP_WINDOW as u64) < POS);
// The home slot is taken from the hash bits a slot keeps.
const _: () = assert!(POS_BITS + INDEX_SLOTS.trailing_zeros() <= 64);

/// How many bytes of an encoded result a slot holds without an allocation
/// of its own. Most results fit: a created VM's name and node (about 20
/// bytes), a deleted VM's name, a short error.
pub(crate) const INLINE_RESULT: usize = 30;

/// One encoded result (bincode): in its slot when short (no allocation per
/// identified write), boxed otherwise.
pub(crate) enum Stored {
    Inline(u8, [u8; INLINE_RESULT]),
    Boxed(Box<[u8]>),
}

impl Stored {
    /// `None` only if the result cannot be encoded, which these types
    /// cannot fail to.
    fn encode(result: &CommandResult) -> Option<Self> {
        let mut buf = [0u8; INLINE_RESULT];
        match codec::encode_into_slice(result, &mut buf) {
            Ok(n) => Some(Stored::Inline(n as u8, buf)),
            Err(_) => codec::encode(result).ok().map(|v| Stored::Boxed(v.into_boxed_slice())),
        }
    }

    /// The result. Bytes this node encoded itself: decoding cannot fail
    /// short of memory corruption, and would only read as "not seen".
    fn decode(&self) -> Option<CommandResult> {
        codec::decode_trusted(self.bytes()).ok()
    }

    /// The result's encoding (bincode of a `CommandResult`).
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Stored::Inline(n, buf) => &buf[..*n as usize],
            Stored::Boxed(b) => b,
        }
    }
}

/// Results of the last [`DEDUP_WINDOW`] identified requests, evicted in
/// apply order (deterministic: the same log gives the same window).
pub(crate) struct Dedup {
    /// The window in apply order: `ring[head..]` then `ring[..head]`.
    /// Grows to [`DEDUP_WINDOW`] (its capacity from the start, so it is
    /// never reallocated), then each new result takes the oldest's slot.
    ring: Vec<(RequestId, Stored)>,
    head: usize,
    /// By id: its hash's high bits and its ring position + 1 ([`POS`]);
    /// 0 is an empty slot. Zeroed memory, so its pages are only resident
    /// once used.
    index: Vec<u64>,
    /// Occupied index slots (always `ring.len()`; checked by
    /// [`Dedup::check`]).
    indexed: usize,
    /// Keyed per process: request ids can be chosen by clients, and a
    /// crafted set of colliding ids must not turn every apply into a long
    /// probe. (Which slot an id takes is never observable.)
    hasher: RandomState,
}

impl Default for Dedup {
    fn default() -> Self {
        Self {
            ring: Vec::with_capacity(DEDUP_WINDOW),
            head: 0,
            index: vec![0; INDEX_SLOTS],
            indexed: 0,
            hasher: RandomState::new(),
        }
    }
}

impl Dedup {
    /// The first result recorded for `id`, if it is in the window.
    pub(crate) fn get(&self, id: &RequestId) -> Option<CommandResult> {
        self.ring[self.find(id, self.hash(id))?.1].1.decode()
    }

    /// Records `result` for `id`, evicting the oldest result when the
    /// window is full. An id already in the window keeps its place and
    /// takes the new result (apply never does this: it answers a known id
    /// from the window; only a restored image can repeat an id).
    pub(crate) fn insert(&mut self, id: RequestId, result: &CommandResult) {
        let Some(stored) = Stored::encode(result) else { return };
        let hash = self.hash(&id);
        if let Some((_, pos)) = self.find(&id, hash) {
            self.ring[pos].1 = stored;
            return;
        }
        let pos = if self.ring.len() < DEDUP_WINDOW {
            self.ring.push((id, stored));
            self.ring.len() - 1
        } else {
            let pos = self.head;
            let oldest = self.ring[pos].0;
            if let Some((slot, _)) = self.find(&oldest, self.hash(&oldest)) {
                self.unindex(slot);
            }
            self.ring[pos] = (id, stored);
            self.head = (pos + 1) % DEDUP_WINDOW;
            pos
        };
        self.index_at(hash, pos);
    }

    /// Indexes an id of hash `hash` (not in the index) at ring position
    /// `pos`: the first free slot from its home.
    fn index_at(&mut self, hash: u64, pos: usize) {
        let mut slot = home(hash);
        while self.index[slot] != 0 {
            slot = (slot + 1) & (INDEX_SLOTS - 1);
        }
        self.index[slot] = (hash & !POS) | (pos as u64 + 1);
        self.indexed += 1;
    }

    /// Empties the window (its memory stays).
    pub(crate) fn clear(&mut self) {
        self.ring.clear();
        self.head = 0;
        self.index.fill(0);
        self.indexed = 0;
    }

    /// Ids and encoded results, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &(RequestId, Stored)> {
        self.ring[self.head..].iter().chain(&self.ring[..self.head])
    }

    /// Ids and results, oldest first.
    pub(crate) fn results(&self) -> impl Iterator<Item = (RequestId, CommandResult)> + '_ {
        self.iter().filter_map(|(id, stored)| Some((*id, stored.decode()?)))
    }

    pub(crate) fn len(&self) -> usize {
        self.ring.len()
    }

    /// The index holds exactly the ring's ids, each at its own position.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.ring.len() > DEDUP_WINDOW || (self.head != 0 && self.ring.len() != DEDUP_WINDOW) {
            return Err(format!("dedup ring holds {} results from {}", self.ring.len(), self.head));
        }
        if self.indexed != self.ring.len() {
            return Err(format!("dedup index holds {} ids for {} results", self.indexed, self.ring.len()));
        }
        // With as many index slots as results, each found at its own
        // position, there is exactly one slot per result.
        for (pos, (id, _)) in self.ring.iter().enumerate() {
            if self.find(id, self.hash(id)).map(|(_, p)| p) != Some(pos) {
                return Err(format!("dedup index does not find {id:?} at ring position {pos}"));
            }
        }
        Ok(())
    }

    fn hash(&self, id: &RequestId) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The index slot and ring position of `id`, whose hash is `hash`. Only
    /// a slot with the same hash bits costs a look at the ring.
    fn find(&self, id: &RequestId, hash: u64) -> Option<(usize, usize)> {
        let mut slot = home(hash);
        loop {
            let at = self.index[slot];
            if at == 0 {
                return None;
            }
            if at & !POS == hash & !POS {
                let pos = (at & POS) as usize - 1;
                if self.ring[pos].0 == *id {
                    return Some((slot, pos));
                }
            }
            slot = (slot + 1) & (INDEX_SLOTS - 1);
        }
    }

    /// Empties index slot `hole` (backward-shift deletion): each later
    /// entry of its probe run that may move into the hole does, so every
    /// remaining id stays reachable from its home slot without tombstones.
    fn unindex(&mut self, mut hole: usize) {
        let mask = INDEX_SLOTS - 1;
        let mut next = hole;
        loop {
            next = (next + 1) & mask;
            let at = self.index[next];
            if at == 0 {
                break;
            }
            let home = home(at);
            // The entry at `next` may fill the hole iff the hole lies on
            // its probe path, from its home slot up to `next`.
            if next.wrapping_sub(home) & mask >= next.wrapping_sub(hole) & mask {
                self.index[hole] = at;
                hole = next;
            }
        }
        self.index[hole] = 0;
        self.indexed -= 1;
    }
}

/// The home slot of a hash (or of an index slot, which keeps the bits
/// used).
fn home(hash: u64) -> usize {
    (hash >> POS_BITS) as usize & (INDEX_SLOTS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::CommandOutput;
    use std::collections::{HashMap, VecDeque};

    fn result(i: u64) -> CommandResult {
        if i.is_multiple_of(7) {
            // Too long for a slot: boxed.
            Err(crate::error::CommandError::VmNotFound { name: format!("vm-{i}-{}", "x".repeat(40)) })
        } else {
            Ok(CommandOutput::VmDeleted { name: format!("vm-{i}"), node_id: 1 })
        }
    }

    /// Against a model (a map and a queue, as the window was before): the
    /// same ids, results and order through fills, evictions, repeated ids
    /// and clears, with the index checked all along.
    #[test]
    fn window_matches_a_map_and_a_queue() {
        let mut d = Dedup::default();
        let mut results: HashMap<RequestId, CommandResult> = HashMap::new();
        let mut order: VecDeque<RequestId> = VecDeque::new();
        // A small generator, so the test is reproducible.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..(3 * DEDUP_WINDOW as u64) {
            let r = next();
            // Mostly new ids; sometimes one already seen (kept or evicted).
            let id = if r % 10 == 0 && step > 0 {
                RequestId { session: 1, seq: next() % step }
            } else {
                RequestId { session: 1, seq: step }
            };
            let res = result(r);
            if step == 2 * DEDUP_WINDOW as u64 {
                d.clear();
                results.clear();
                order.clear();
            }
            d.insert(id, &res);
            if results.insert(id, res).is_none() {
                order.push_back(id);
                if order.len() > DEDUP_WINDOW {
                    let old = order.pop_front().unwrap();
                    results.remove(&old);
                }
            }
            if step % 4096 == 0 {
                d.check().unwrap();
            }
            let probe = RequestId { session: 1, seq: next() % (step + 1) };
            assert_eq!(d.get(&probe), results.get(&probe).cloned(), "step {step}");
        }
        d.check().unwrap();
        assert_eq!(d.len(), order.len());
        let ids: Vec<RequestId> = d.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, Vec::from(order.clone()));
        for id in &order {
            assert_eq!(d.get(id), results.get(id).cloned());
        }
    }

    /// Ids homed at `homes` (found by search), indexed in order; then each
    /// victim is unindexed (every other id must still be found where it
    /// is) and indexed again.
    fn probe_run(homes: &[usize], victims: &[usize]) {
        let mut d = Dedup::default();
        let ids: Vec<RequestId> = (0..)
            .map(|seq| RequestId { session: 9, seq })
            .filter(|id| homes.contains(&home(d.hash(id))))
            .take(8)
            .collect();
        for (i, id) in ids.iter().enumerate() {
            d.insert(*id, &result(i as u64 + 1));
        }
        d.check().unwrap();
        for &victim in victims {
            let hash = d.hash(&ids[victim]);
            let (slot, _) = d.find(&ids[victim], hash).unwrap();
            d.unindex(slot);
            assert!(d.find(&ids[victim], hash).is_none());
            for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != victim) {
                assert_eq!(d.find(id, d.hash(id)).map(|(_, p)| p), Some(i), "after removing {victim}");
            }
            d.index_at(hash, victim);
            d.check().unwrap();
        }
    }

    /// Colliding ids, all homed at one slot (the longest runs
    /// backward-shift deletion sees), and ids homed on both sides of the
    /// index's end, whose run wraps around to its start.
    #[test]
    fn probe_runs_survive_removals_from_their_middle() {
        let d = Dedup::default();
        probe_run(&[home(d.hash(&RequestId { session: 9, seq: 0 }))], &[2, 0, 7, 4]);
        let end = INDEX_SLOTS - 1;
        probe_run(&[end - 1, end, 0, 1], &[0, 3, 7, 1, 5]);
    }
}
