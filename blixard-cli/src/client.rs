//! A thin client over the gRPC control API that turns every failure into
//! one clear line and an exit code (2 when a VM fits nowhere).
use std::time::Duration;

use blixard_proto as pb;
use blixard_proto::cluster_service_client::ClusterServiceClient;
use blixard_proto::vm_service_client::VmServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::Failure;

/// Exit code for "no node can fit this VM".
pub const EXIT_NO_CAPACITY: u8 = 2;
const DEADLINE: Duration = Duration::from_secs(30);

pub struct Client {
    addr: String,
    cluster: ClusterServiceClient<Channel>,
    vms: VmServiceClient<Channel>,
}

pub fn status_failure(addr: &str, s: Status) -> Failure {
    let code = if s.code() == Code::ResourceExhausted { EXIT_NO_CAPACITY } else { 1 };
    let message = match s.code() {
        Code::Unavailable
            if s.message().contains("tcp connect") || s.message().contains("onnection refused") =>
        {
            format!(
                "cannot reach a blixard node at {addr}: {} (is it running? see --addr / BLIXARD_ADDR)",
                s.message()
            )
        }
        Code::DeadlineExceeded => format!("{addr} did not answer in time: {}", s.message()),
        _ => s.message().to_string(),
    };
    Failure { message, code }
}

fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(DEADLINE);
    r
}

fn consistency(stale: bool) -> i32 {
    if stale {
        pb::Consistency::Stale as i32
    } else {
        pb::Consistency::Linearizable as i32
    }
}

impl Client {
    pub async fn connect(addr: &str) -> Result<Client, Failure> {
        let channel = channel(addr).await?;
        Ok(Client {
            addr: addr.to_string(),
            cluster: ClusterServiceClient::new(channel.clone()),
            vms: VmServiceClient::new(channel),
        })
    }

    fn fail(&self) -> impl Fn(Status) -> Failure + '_ {
        move |s| status_failure(&self.addr, s)
    }

    pub async fn status(&mut self, digest: bool) -> Result<pb::StatusResponse, Failure> {
        let r = self.cluster.status(req(pb::StatusRequest { include_digest: digest })).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    pub async fn join(&mut self, node_id: u64, addr: String) -> Result<pb::JoinResponse, Failure> {
        let mut r = req(pb::JoinRequest { node_id, addr });
        r.set_timeout(Duration::from_secs(120));
        Ok(self.cluster.join(r).await.map_err(self.fail())?.into_inner())
    }

    pub async fn leave(&mut self) -> Result<pb::MembershipResponse, Failure> {
        Ok(self.cluster.leave(req(pb::LeaveRequest {})).await.map_err(self.fail())?.into_inner())
    }

    pub async fn remove(&mut self, node_id: u64) -> Result<pb::MembershipResponse, Failure> {
        Ok(self.cluster.remove(req(pb::RemoveRequest { node_id })).await.map_err(self.fail())?.into_inner())
    }

    /// Creates a VM; returns it with the write's log index.
    pub async fn create_vm(
        &mut self,
        name: String,
        spec: pb::VmSpec,
        no_start: bool,
    ) -> Result<(pb::Vm, u64), Failure> {
        let r = self
            .vms
            .create_vm(req(pb::CreateVmRequest {
                name,
                spec: Some(spec),
                no_start,
                request_id: String::new(),
            }))
            .await;
        written(r.map_err(self.fail())?.into_inner())
    }

    pub async fn get_vm(&mut self, name: String, stale: bool) -> Result<pb::Vm, Failure> {
        let r = self.vms.get_vm(req(pb::GetVmRequest { name, consistency: consistency(stale) })).await;
        r.map_err(self.fail())?.into_inner().vm.ok_or_else(|| Failure::new("server returned no VM"))
    }

    pub async fn list_vms(&mut self, node_id: u64, stale: bool) -> Result<Vec<pb::Vm>, Failure> {
        let r = self.vms.list_vms(req(pb::ListVmsRequest { consistency: consistency(stale), node_id })).await;
        Ok(r.map_err(self.fail())?.into_inner().vms)
    }

    pub async fn start_vm(&mut self, name: String) -> Result<(pb::Vm, u64), Failure> {
        let r = self.vms.start_vm(req(pb::VmNameRequest { name, request_id: String::new() })).await;
        written(r.map_err(self.fail())?.into_inner())
    }

    pub async fn stop_vm(&mut self, name: String) -> Result<(pb::Vm, u64), Failure> {
        let r = self.vms.stop_vm(req(pb::VmNameRequest { name, request_id: String::new() })).await;
        written(r.map_err(self.fail())?.into_inner())
    }

    pub async fn restart_vm(&mut self, name: String) -> Result<(pb::Vm, u64), Failure> {
        let r = self.vms.restart_vm(req(pb::VmNameRequest { name, request_id: String::new() })).await;
        written(r.map_err(self.fail())?.into_inner())
    }

    pub async fn vm_logs(&mut self, name: String, offset: u64) -> Result<pb::VmLogsResponse, Failure> {
        let r = self.vms.vm_logs(req(pb::VmLogsRequest { name, offset, max_bytes: 0 })).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// Asks this client's node (no forwarding) what its backend sees.
    pub async fn local_vm(&mut self, name: String) -> Result<pb::LocalVmResponse, Failure> {
        let r = self.vms.local_vm(req(pb::VmNameRequest { name, request_id: String::new() })).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    pub async fn delete_vm(&mut self, name: String) -> Result<(), Failure> {
        self.vms
            .delete_vm(req(pb::DeleteVmRequest { name, request_id: String::new() }))
            .await
            .map_err(self.fail())?;
        Ok(())
    }
}

fn written(r: pb::VmResponse) -> Result<(pb::Vm, u64), Failure> {
    Ok((r.vm.ok_or_else(|| Failure::new("server returned no VM"))?, r.index))
}

/// Connects to `addr` (HOST:PORT), failing with a clear message.
pub async fn channel(addr: &str) -> Result<Channel, Failure> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Failure::new(format!("invalid address {addr:?}: {e} (expected HOST:PORT)")))?
        .connect_timeout(Duration::from_secs(3));
    endpoint.connect().await.map_err(|e| {
        Failure::new(format!(
            "cannot reach a blixard node at {addr}: {} (is it running? see --addr / BLIXARD_ADDR)",
            source_chain(&e)
        ))
    })
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
