//! Placement: a pure function of the free-capacity index, the cluster's
//! strategy and a request.
//!
//! `spread` (default): among active nodes that fit the request in every
//! dimension, the one with the most free memory; ties go to the lowest node
//! id. The index is ordered exactly that way, so the first fit is the answer
//! and the scan stops as soon as free memory drops below the request.
//! `binpack`: the one with the least free memory that fits (ties: lowest
//! id), walking the index from the other end.
use std::cmp::Reverse;
use std::collections::BTreeSet;

use crate::error::CommandError;
use crate::types::{NodeId, Resources, Strategy};

/// Ordered by (most free memory, lowest id). Only active nodes are indexed.
pub type FreeIndex = BTreeSet<(Reverse<u64>, NodeId)>;

/// Picks a node for `need` under `strategy`. `free_of` returns a node's
/// current free resources (allocatable minus allocated).
pub fn place(
    index: &FreeIndex,
    need: &Resources,
    strategy: Strategy,
    mut free_of: impl FnMut(NodeId) -> Option<Resources>,
) -> Result<NodeId, CommandError> {
    if strategy == Strategy::Binpack {
        // Least free memory first: walk backwards from the first node with
        // enough memory (a range, so nearly full nodes cost nothing), and
        // among nodes with the same free memory take the lowest id (they
        // come in descending id order here).
        let mut best: Option<(u64, NodeId)> = None;
        for &(Reverse(free_mem), id) in index.range(..=(Reverse(need.memory_mb), NodeId::MAX)).rev() {
            if best.is_some_and(|(m, _)| m != free_mem) {
                break;
            }
            if free_of(id).is_some_and(|free| need.fits_in(&free)) {
                best = Some((free_mem, id));
            }
        }
        if let Some((_, id)) = best {
            return Ok(id);
        }
    }
    let mut best_free: Option<(NodeId, Resources)> = None;
    for &(Reverse(free_mem), id) in index {
        if free_mem < need.memory_mb {
            break;
        }
        let Some(free) = free_of(id) else { continue };
        if need.fits_in(&free) {
            // (Binpack found no fit above, so it only explains here.)
            return Ok(id);
        }
        best_free.get_or_insert((id, free));
    }
    let reason = if index.is_empty() {
        "the cluster has no active nodes".to_string()
    } else {
        match best_free {
            Some((id, free)) => format!(
                "{} active node(s); nodes with enough memory lack vCPUs or disk (e.g. node {id} has {free} free)",
                index.len()
            ),
            None => {
                let (Reverse(mem), id) = index.first().copied().unwrap_or((Reverse(0), 0));
                format!("{} active node(s); the most free memory is {mem} MiB on node {id}", index.len())
            }
        }
    };
    Err(CommandError::NoCapacity { needed: *need, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn index(nodes: &HashMap<NodeId, Resources>) -> FreeIndex {
        nodes.iter().map(|(id, r)| (Reverse(r.memory_mb), *id)).collect()
    }

    #[test]
    fn most_free_memory_then_lowest_id() {
        let nodes = HashMap::from([
            (1, Resources::new(4, 1000, 10)),
            (2, Resources::new(4, 2000, 10)),
            (3, Resources::new(4, 2000, 10)),
        ]);
        let idx = index(&nodes);
        let got =
            place(&idx, &Resources::new(1, 100, 1), Strategy::Spread, |id| nodes.get(&id).copied()).unwrap();
        assert_eq!(got, 2);
    }

    #[test]
    fn skips_nodes_short_of_cpu_or_disk() {
        let nodes = HashMap::from([(1, Resources::new(1, 5000, 10)), (2, Resources::new(8, 1000, 10))]);
        let idx = index(&nodes);
        let got =
            place(&idx, &Resources::new(2, 500, 1), Strategy::Spread, |id| nodes.get(&id).copied()).unwrap();
        assert_eq!(got, 2);
    }

    #[test]
    fn explains_why_nothing_fits() {
        let nodes = HashMap::from([(1, Resources::new(1, 5000, 10))]);
        let idx = index(&nodes);
        let e = place(&idx, &Resources::new(1, 6000, 1), Strategy::Spread, |id| nodes.get(&id).copied())
            .unwrap_err();
        assert!(e.to_string().contains("most free memory is 5000 MiB on node 1"), "{e}");
        let e = place(&idx, &Resources::new(2, 100, 1), Strategy::Binpack, |id| nodes.get(&id).copied())
            .unwrap_err();
        assert!(e.to_string().contains("lack vCPUs or disk"), "{e}");
        let e = place(&FreeIndex::new(), &Resources::new(1, 1, 1), Strategy::Binpack, |_| None).unwrap_err();
        assert!(e.to_string().contains("no active nodes"), "{e}");
    }

    #[test]
    fn binpack_takes_the_least_free_node_that_fits() {
        let nodes = HashMap::from([
            (1, Resources::new(4, 3000, 10)),
            (2, Resources::new(4, 1000, 10)),
            (3, Resources::new(4, 1000, 10)),
            (4, Resources::new(0, 600, 10)),
            (5, Resources::new(4, 400, 10)),
        ]);
        let idx = index(&nodes);
        let place_bp = |need: Resources| place(&idx, &need, Strategy::Binpack, |id| nodes.get(&id).copied());
        // 5 is too small, 4 lacks vCPUs; 2 and 3 tie: lowest id.
        assert_eq!(place_bp(Resources::new(1, 500, 1)).unwrap(), 2);
        assert_eq!(place_bp(Resources::new(1, 300, 1)).unwrap(), 5);
        assert_eq!(place_bp(Resources::new(1, 2000, 1)).unwrap(), 1);
        let e = place_bp(Resources::new(1, 5000, 1)).unwrap_err();
        assert!(e.to_string().contains("most free memory is 3000 MiB on node 1"), "{e}");
    }
}
