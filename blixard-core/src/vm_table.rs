//! The VM table: read by many threads at once without locks, written by one.
//!
//! VM reads are the hottest path in a node (API handlers, every reconciler
//! tick), and a lock, even a sharded read lock, makes every read
//! write its lock word: two cores reading the same shard keep stealing that
//! cache line from each other, so reads stop scaling with cores. Here a
//! reader loads the published [`VmTable`] (`ArcSwap::load` writes only
//! thread-local state) and looks it up like any `HashMap`: no shared writes,
//! no allocation, and a consistent view (by name and by node agree).
//!
//! The writer (the Raft apply task) keeps two tables, left-right style: it
//! changes the spare one, recording each change, and publishes it with one
//! atomic swap; the table it swapped out becomes the next spare and replays
//! the recorded changes before it is written again. So a change costs two
//! `HashMap` updates instead of a copy of the table. If a reader still holds
//! the spare when the writer needs it (a long iteration), the writer copies
//! the published table instead of waiting: readers never block the writer,
//! the writer never blocks readers.
//!
//! Readers see whole apply runs: the state machine publishes once per batch
//! of entries, so nobody observes half of a batch that is then rolled back.
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use parking_lot::{Mutex, MutexGuard};

use crate::types::{NodeId, VmRecord};

/// xxh3 with a random per-table seed: fast for short names, and a client
/// choosing names cannot aim them at one bucket.
#[derive(Clone, Copy, Debug)]
pub struct NameHash {
    seed: u64,
}

impl NameHash {
    fn random() -> Self {
        let seed = std::collections::hash_map::RandomState::new().hash_one("blixard vm names");
        Self { seed }
    }
}

impl BuildHasher for NameHash {
    type Hasher = NameHasher;
    fn build_hasher(&self) -> NameHasher {
        NameHasher(self.seed)
    }
}

pub struct NameHasher(u64);

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }
    // `str`'s `Hash` appends 0xff to separate fields; a map key is one whole
    // string, so the terminator only costs a second round.
    fn write_u8(&mut self, _: u8) {}
}

/// One version of the VM table.
#[derive(Clone, Debug)]
pub struct VmTable {
    by_name: HashMap<Arc<str>, Arc<VmRecord>, NameHash>,
    by_node: HashMap<NodeId, BTreeSet<Arc<str>>>,
}

impl VmTable {
    fn new(hash: NameHash) -> Self {
        Self { by_name: HashMap::with_hasher(hash), by_node: HashMap::new() }
    }

    #[inline]
    pub fn get(&self, name: &str) -> Option<&Arc<VmRecord>> {
        self.by_name.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Every VM, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &VmRecord> {
        self.by_name.values().map(|v| &**v)
    }

    /// The names of the VMs placed on `node`, in name order.
    pub fn names_on(&self, node: NodeId) -> impl Iterator<Item = &Arc<str>> {
        self.by_node.get(&node).into_iter().flatten()
    }

    /// The VMs placed on `node`, in name order.
    pub fn on_node(&self, node: NodeId) -> impl Iterator<Item = &VmRecord> {
        self.names_on(node).filter_map(|n| self.by_name.get(n).map(|v| &**v))
    }

    /// Whether `vm` is in the by-node index under its node.
    pub fn is_indexed(&self, vm: &VmRecord) -> bool {
        self.by_node.get(&vm.node_id).is_some_and(|set| set.contains(&vm.name))
    }

    /// How many VMs the by-node index holds (equals `len` when consistent).
    pub fn indexed_len(&self) -> usize {
        self.by_node.values().map(BTreeSet::len).sum()
    }

    fn apply(&mut self, op: &VmOp) {
        match op {
            VmOp::Put(rec) => {
                if let Some(old) = self.by_name.insert(rec.name.clone(), rec.clone()) {
                    if old.node_id == rec.node_id {
                        return;
                    }
                    self.unindex(&old);
                }
                self.by_node.entry(rec.node_id).or_default().insert(rec.name.clone());
            }
            VmOp::Remove(name) => {
                if let Some(old) = self.by_name.remove(name) {
                    self.unindex(&old);
                }
            }
        }
    }

    fn unindex(&mut self, vm: &VmRecord) {
        if let Some(set) = self.by_node.get_mut(&vm.node_id) {
            set.remove(&vm.name);
            if set.is_empty() {
                self.by_node.remove(&vm.node_id);
            }
        }
    }
}

/// A change to the table, kept so the other copy can replay it.
#[derive(Debug)]
enum VmOp {
    Put(Arc<VmRecord>),
    Remove(Arc<str>),
}

/// The published table plus the writer's spare.
pub struct VmTables {
    current: ArcSwap<VmTable>,
    writer: Mutex<Spare>,
}

struct Spare {
    table: Option<Arc<VmTable>>,
    /// Changes published after `table` was swapped out, in order.
    behind: Vec<VmOp>,
}

impl Default for VmTables {
    fn default() -> Self {
        let empty = VmTable::new(NameHash::random());
        Self {
            current: ArcSwap::from_pointee(empty.clone()),
            writer: Mutex::new(Spare { table: Some(Arc::new(empty)), behind: Vec::new() }),
        }
    }
}

impl VmTables {
    /// The current version. Hold it briefly: a reader keeping one across
    /// many publishes makes the writer copy a table once.
    #[inline]
    pub fn load(&self) -> Guard<Arc<VmTable>> {
        self.current.load()
    }

    /// Starts a run of changes. They become visible to readers, all at
    /// once, when the writer is published (or dropped). One writer at a time.
    pub fn write(&self) -> VmWriter<'_> {
        let mut spare = self.writer.lock();
        let mut behind = std::mem::take(&mut spare.behind);
        let caught_up = spare.table.take().and_then(|mut t| {
            let table = Arc::get_mut(&mut t)?;
            for op in &behind {
                table.apply(op);
            }
            Some(t)
        });
        // If a reader still holds the spare (or there is none), start from a
        // copy of the published table, which is up to date.
        let table = caught_up.unwrap_or_else(|| Arc::new(VmTable::clone(&self.current.load())));
        behind.clear();
        VmWriter { tables: self, spare, table: Some(table), ops: behind }
    }
}

/// Exclusive access to the next version of the table.
pub struct VmWriter<'a> {
    tables: &'a VmTables,
    spare: MutexGuard<'a, Spare>,
    /// Always `Some` until published; exclusively owned (`Arc::get_mut` works).
    table: Option<Arc<VmTable>>,
    ops: Vec<VmOp>,
}

impl VmWriter<'_> {
    /// The table as this run has changed it so far.
    pub fn table(&self) -> &VmTable {
        self.table.as_deref().expect("writer used after publish")
    }

    pub fn get(&self, name: &str) -> Option<&Arc<VmRecord>> {
        self.table().get(name)
    }

    fn apply(&mut self, op: VmOp) {
        let table = self.table.as_mut().and_then(Arc::get_mut).expect("writer owns its table");
        table.apply(&op);
        self.ops.push(op);
    }

    /// Inserts or replaces the VM named `rec.name`.
    pub fn put(&mut self, rec: Arc<VmRecord>) {
        self.apply(VmOp::Put(rec));
    }

    /// Removes the VM named `name`, returning it.
    pub fn remove(&mut self, name: &str) -> Option<Arc<VmRecord>> {
        let old = self.get(name)?.clone();
        self.apply(VmOp::Remove(old.name.clone()));
        Some(old)
    }

    /// Replaces the VM named `name` with `f` applied to a copy of it. `f`
    /// must not change the name. Returns `f`'s result, or `None` if there is no such VM.
    pub fn update<R>(&mut self, name: &str, f: impl FnOnce(&mut VmRecord) -> R) -> Option<R> {
        let mut rec = VmRecord::clone(self.get(name)?);
        let r = f(&mut rec);
        debug_assert_eq!(&*rec.name, name, "update renamed a VM");
        self.put(Arc::new(rec));
        Some(r)
    }

    /// Replaces the whole table (snapshot install).
    pub fn replace_all(&mut self, records: impl IntoIterator<Item = Arc<VmRecord>>) {
        let names: Vec<Arc<str>> = self.table().by_name.keys().cloned().collect();
        for name in names {
            self.apply(VmOp::Remove(name));
        }
        for rec in records {
            self.apply(VmOp::Put(rec));
        }
    }

    /// Makes this run's changes visible to readers and ends the run (the
    /// next one may start); returns whether there were any changes.
    pub fn publish(mut self) -> bool {
        self.publish_in_place()
    }

    /// `publish` for an owner that cannot give the writer away (a `Drop`);
    /// the writer is spent afterwards, and publishing again does nothing.
    pub(crate) fn publish_in_place(&mut self) -> bool {
        let Some(table) = self.table.take() else { return false };
        if self.ops.is_empty() {
            self.spare.table = Some(table);
            return false;
        }
        let previous = self.tables.current.swap(table);
        self.spare.table = Some(previous);
        self.spare.behind = std::mem::take(&mut self.ops);
        true
    }
}

impl Drop for VmWriter<'_> {
    fn drop(&mut self) {
        // A run cut short by a panic is not published: readers keep the last
        // whole version, and the next writer starts from a copy of it.
        if !std::thread::panicking() {
            self.publish_in_place();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{DesiredState, ObservedState, VmSpec};

    fn vm(name: &str, node: NodeId, revision: u64) -> Arc<VmRecord> {
        Arc::new(VmRecord {
            name: name.into(),
            spec: VmSpec::default(),
            node_id: node,
            desired: DesiredState::Running,
            observed: ObservedState::Pending,
            created_at_ms: 0,
            updated_at_ms: 0,
            revision,
            generation: 0,
            runtime: Default::default(),
            placement: Default::default(),
            queued_at: 0,
            preempted_by: String::new(),
            leaving: 0,
            reschedule: Default::default(),
            history: Vec::new(),
            moving: None,
            placement_gen: 0,
            ip: None,
            publish: Vec::new(),
        })
    }

    fn contents(t: &VmTable) -> Vec<(String, NodeId, u64)> {
        let mut v: Vec<_> = t.iter().map(|r| (r.name.to_string(), r.node_id, r.revision)).collect();
        v.sort();
        v
    }

    #[test]
    fn readers_see_whole_runs_and_both_copies_converge() {
        let tables = VmTables::default();
        let mut w = tables.write();
        w.put(vm("a", 1, 1));
        w.put(vm("b", 2, 1));
        assert!(tables.load().is_empty(), "unpublished changes are visible");
        assert!(w.publish());
        assert_eq!(contents(&tables.load()), [("a".into(), 1, 1), ("b".into(), 2, 1)]);

        // The next run writes the other copy, which first catches up.
        let mut w = tables.write();
        assert_eq!(w.table().len(), 2, "spare did not replay the previous run");
        w.update("a", |r| r.revision = 2);
        w.remove("b");
        w.put(vm("c", 1, 2));
        drop(w); // publishes
        let t = tables.load();
        assert_eq!(contents(&t), [("a".into(), 1, 2), ("c".into(), 1, 2)]);
        let on1: Vec<&str> = t.on_node(1).map(|r| &*r.name).collect();
        assert_eq!(on1, ["a", "c"]);
        assert_eq!(t.names_on(2).count(), 0);
        drop(t);

        // Many alternating runs keep the two copies identical.
        for i in 0..50u64 {
            let mut w = tables.write();
            w.put(vm(&format!("v{}", i % 7), i % 3, i));
            if i % 4 == 0 {
                w.remove(&format!("v{}", (i + 3) % 7));
            }
            let expect = contents(w.table());
            w.publish();
            assert_eq!(contents(&tables.load()), expect);
            assert_eq!(tables.load().indexed_len(), tables.load().len());
        }
    }

    #[test]
    fn a_reader_holding_the_spare_never_blocks_the_writer() {
        let tables = VmTables::default();
        let mut w = tables.write();
        w.put(vm("a", 1, 1));
        w.publish();
        let held = tables.load_full_for_test();
        // Two publishes: the held table is the spare for the second one.
        for rev in 2..=3 {
            let mut w = tables.write();
            w.update("a", |r| r.revision = rev);
            w.publish();
        }
        assert_eq!(held.get("a").map(|r| r.revision), Some(1), "a held version changed");
        assert_eq!(tables.load().get("a").map(|r| r.revision), Some(3));
        drop(held);
        let mut w = tables.write();
        w.put(vm("b", 2, 4));
        w.publish();
        assert_eq!(contents(&tables.load()), [("a".into(), 1, 3), ("b".into(), 2, 4)]);
    }

    #[test]
    fn a_run_without_changes_publishes_nothing() {
        let tables = VmTables::default();
        let before = Arc::as_ptr(&tables.load_full_for_test());
        assert!(!tables.write().publish());
        assert_eq!(Arc::as_ptr(&tables.load_full_for_test()), before);
    }

    /// Readers on other threads, while the writer publishes run after run,
    /// always see a whole version: the indices agree with the table, a run's
    /// two changes appear together, and nothing goes back in time.
    #[test]
    fn concurrent_readers_see_consistent_versions() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let tables = VmTables::default();
        let done = AtomicBool::new(false);
        const RUNS: u64 = 3_000;
        std::thread::scope(|s| {
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let (mut last, mut reads) = (0u64, 0u64);
                        while !done.load(Ordering::Acquire) || reads == 0 {
                            let t = tables.load();
                            reads += 1;
                            assert_eq!(t.indexed_len(), t.len(), "index and table disagree");
                            let Some(a) = t.get("a").map(|r| r.revision) else { continue };
                            // Each run moves "a" and "b" to the same revision.
                            assert_eq!(t.get("b").map(|r| r.revision), Some(a), "half a run visible");
                            assert!(a >= last, "went back from revision {last} to {a}");
                            assert!(t.iter().all(|v| t.is_indexed(v)));
                            last = a;
                        }
                        (last, reads)
                    })
                })
                .collect();
            for rev in 1..=RUNS {
                let mut w = tables.write();
                w.put(vm("a", rev % 3, rev));
                w.put(vm("b", 1, rev));
                if rev % 10 == 0 {
                    w.remove(&format!("tmp-{}", rev - 10));
                }
                w.put(vm(&format!("tmp-{rev}"), rev % 4, rev));
                w.publish();
            }
            done.store(true, Ordering::Release);
            for r in readers {
                let (last, reads) = r.join().expect("reader panicked");
                assert!(reads > 0 && last <= RUNS);
            }
        });
        let t = tables.load();
        assert_eq!(t.get("a").map(|r| r.revision), Some(RUNS));
        // a, b, one tmp per run, minus the removals from run 20 on (tmp-0 never existed).
        assert_eq!(t.len() as u64, 2 + RUNS - (RUNS / 10 - 1));
    }

    impl VmTables {
        fn load_full_for_test(&self) -> Arc<VmTable> {
            self.current.load_full()
        }
    }
}
