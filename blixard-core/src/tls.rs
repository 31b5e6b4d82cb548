//! TEMPORARY until the tls branch merges (replaced by its tls.rs).
use crate::auth::Role;
use crate::types::NodeId;

pub fn peer_node<T>(_req: &tonic::Request<T>) -> Option<NodeId> {
    None
}

pub fn peer_client<T>(_req: &tonic::Request<T>) -> Option<(String, Role)> {
    None
}
