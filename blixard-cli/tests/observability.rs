//! Observability of real `blixard` processes, checked with plain gRPC
//! clients and an OTLP receiver run by the test: the standard health
//! service follows quorum, reflection describes every service, JSON logs
//! parse, and a write sent to a follower is one trace across the forward.
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

mod common;
use common::{eventually, free_port, json_of, node_command, Nodes};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Waits until the cluster has three voters, a leader and three registered
/// nodes; returns the leader's id.
fn formed(port: u16) -> u64 {
    let s = eventually("3 voters, a leader and 3 registered nodes", 90, || {
        let out = common::cli(port, &["cluster", "status", "-o", "json"]);
        let s: Value = serde_json::from_slice(&out.stdout).ok().filter(|_| out.status.success())?;
        let voters = s["members"].as_array()?.iter().filter(|m| m["role"] != "learner").count();
        (voters == 3 && s["leader_id"].is_u64() && s["nodes"].as_array()?.len() == 3).then_some(s)
    });
    s["leader_id"].as_u64().unwrap()
}

/// A plain tonic channel to `addr`.
async fn channel(addr: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await
}

const SERVICES: [&str; 3] = ["", "blixard.v1.ClusterService", "blixard.v1.VmService"];

/// The health status of `service` at `addr`, or the gRPC error code.
async fn health(addr: &str, service: &str) -> Result<ServingStatus, tonic::Code> {
    let mut c = HealthClient::new(channel(addr).await.map_err(|_| tonic::Code::Unavailable)?);
    let r = c.check(HealthCheckRequest { service: service.to_string() }).await.map_err(|s| s.code())?;
    Ok(r.into_inner().status())
}

/// Polls until every Blixard service at `addr` reports `want`.
fn health_becomes(rt: &tokio::runtime::Runtime, addr: &str, want: ServingStatus, secs: u64) {
    eventually(&format!("{addr} reports {want:?} for every service"), secs, || {
        rt.block_on(async {
            for s in SERVICES {
                if health(addr, s).await != Ok(want) {
                    return None;
                }
            }
            Some(())
        })
    });
}

#[test]
fn health_follows_quorum_and_reflection_describes_the_services() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = Nodes::three(root.path());
    let leader = formed(nodes.port(1));
    let rt = runtime();
    for id in 1..=3 {
        health_becomes(&rt, &nodes.addr(id), ServingStatus::Serving, 30);
    }
    // An unknown service is NOT_FOUND, as the health protocol says.
    assert_eq!(rt.block_on(health(&nodes.addr(1), "no.such.Service")), Err(tonic::Code::NotFound));

    rt.block_on(reflection_v1(&nodes.addr(leader)));
    rt.block_on(reflection_v1alpha(&nodes.addr(leader)));

    // The leader alone: it still believes it leads, but no quorum answers.
    for id in (1..=3).filter(|i| *i != leader) {
        nodes.kill(id);
    }
    health_becomes(&rt, &nodes.addr(leader), ServingStatus::NotServing, 15);
}

/// The v1 reflection service lists Blixard's and the health service and
/// returns their file descriptors.
async fn reflection_v1(addr: &str) {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let mut c = ServerReflectionClient::new(channel(addr).await.unwrap());
    let ask = |m: MessageRequest| ServerReflectionRequest { host: String::new(), message_request: Some(m) };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol("blixard.v1.ClusterService".into())),
        ask(MessageRequest::FileContainingSymbol("blixard.v1.VmService".into())),
        ask(MessageRequest::FileContainingSymbol("grpc.health.v1.Health".into())),
    ];
    let mut replies = c.server_reflection_info(futures::stream::iter(requests)).await.unwrap().into_inner();
    let mut answers = Vec::new();
    while let Some(r) = replies.message().await.unwrap() {
        answers.push(r.message_response.expect("a response"));
    }
    assert_eq!(answers.len(), 4);
    let MessageResponse::ListServicesResponse(list) = &answers[0] else { panic!("{:?}", answers[0]) };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["blixard.v1.ClusterService", "blixard.v1.VmService", "grpc.health.v1.Health"] {
        assert!(names.contains(&want), "{want} not listed: {names:?}");
    }
    for (answer, service) in answers[1..].iter().zip(["ClusterService", "VmService", "Health"]) {
        let MessageResponse::FileDescriptorResponse(f) = answer else { panic!("{answer:?}") };
        let files: Vec<prost_types::FileDescriptorProto> = f
            .file_descriptor_proto
            .iter()
            .map(|b| prost_types::FileDescriptorProto::decode(&b[..]).unwrap())
            .collect();
        assert!(
            files.iter().any(|fd| fd.service.iter().any(|s| s.name() == service)),
            "no descriptor defines {service}: {:?}",
            files.iter().map(|fd| fd.name()).collect::<Vec<_>>()
        );
    }
}

/// Older tools still speak v1alpha.
async fn reflection_v1alpha(addr: &str) {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

    let mut c = ServerReflectionClient::new(channel(addr).await.unwrap());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = c.server_reflection_info(futures::stream::iter(vec![req])).await.unwrap().into_inner();
    let r = replies.message().await.unwrap().expect("a reply");
    let Some(MessageResponse::ListServicesResponse(list)) = r.message_response else { panic!("{r:?}") };
    assert!(list.service.iter().any(|s| s.name == "blixard.v1.VmService"), "{list:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let dir = root.path().join("node-1");
    let stderr = std::fs::File::create(root.path().join("stderr.log")).unwrap();
    let mut child =
        node_command(1, port, &dir, None, ["16", "8192", "100"], "none", &["--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut child);
    let text = eventually("the node registered itself (a log line says so)", 60, || {
        let text = std::fs::read_to_string(root.path().join("stderr.log")).ok()?;
        text.contains("registered node capacity").then_some(text)
    });
    let mut messages = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&v["level"].as_str().unwrap()),
            "{line}"
        );
        assert!(v["target"].as_str().is_some_and(|t| !t.is_empty()), "{line}");
        assert!(v["fields"].is_object(), "{line}");
        messages.push(v);
    }
    let reg = messages
        .iter()
        .find(|v| v["fields"]["message"] == "registered node capacity")
        .expect("the registration line");
    assert_eq!(reg["level"], "INFO");
    assert_eq!(reg["fields"]["node"], 1, "structured fields stay fields: {reg}");
    assert!(reg["target"].as_str().unwrap().starts_with("blixard_core"), "{reg}");
}

/// Spans received by the test's OTLP collector, flattened.
#[derive(Clone, Debug)]
struct Got {
    node: i64,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    attrs: HashMap<String, String>,
    status: i32,
    /// Span ids this span links to (a batch, to the proposals it carries
    /// after the first).
    links: Vec<Vec<u8>>,
}

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Got>>>);

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = attrs(rs.resource.as_ref().map(|r| &r.attributes[..]).unwrap_or(&[]));
            assert_eq!(resource.get("service.name").map(String::as_str), Some("blixard"));
            let node = resource.get("blixard.node.id").and_then(|n| n.parse().ok()).unwrap_or(0);
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        node,
                        name: s.name.clone(),
                        trace: s.trace_id.clone(),
                        id: s.span_id.clone(),
                        parent: s.parent_span_id.clone(),
                        attrs: attrs(&s.attributes),
                        status: s.status.as_ref().map(|st| st.code).unwrap_or(0),
                        links: s.links.iter().map(|l| l.span_id.clone()).collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Starts the collector on a loopback port; returns its URL.
fn start_collector(rt: &tokio::runtime::Runtime, collector: Collector) -> String {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    url
}

/// Three nodes export to the collector; a VM created through a follower
/// is one trace: the follower's API span, its forward, and the leader's
/// propose handler and batch, each the child of the one before.
#[test]
fn a_write_through_a_follower_is_one_trace_across_the_forward() {
    let rt = runtime();
    let collector = Collector::default();
    let url = start_collector(&rt, collector.clone());
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (1..=3).map(|i| root.path().join(format!("node-{i}"))).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let start = |i: usize, join: Option<u16>| traced_node(i as u64 + 1, ports[i], &dirs[i], join, &url);
    let mut nodes = Nodes { procs: vec![(1, start(0, None))], dirs: dirs.clone(), ports: ports.clone() };
    for i in 1..3 {
        nodes.procs.push((i as u64 + 1, start(i, Some(ports[0]))));
    }
    let leader = formed(ports[0]);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let out = json_of(
        nodes.port(follower),
        &["vm", "create", "traced", "--vcpus", "1", "--memory", "64", "-o", "json"],
    );
    assert_eq!(out["name"], "traced", "{out}");

    let summary = |got: &[Got]| -> Vec<String> {
        got.iter()
            .map(|s| {
                format!("node {} {} trace {:02x?} parent {:02x?}", s.node, s.name, &s.trace[..4], s.parent)
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let found = loop {
        let got = collector.0.lock().unwrap().clone();
        let found = (|| {
            let api = got
                .iter()
                .find(|s| s.node == follower as i64 && s.name.starts_with("blixard.v1.VmService/CreateVm"))?;
            let in_trace = |name: &str, node: u64| {
                got.iter().find(|s| s.trace == api.trace && s.name == name && s.node == node as i64).cloned()
            };
            let handler = in_trace("raft.Propose", leader)?;
            // The batch is the handler's child if this write came first in
            // it, else it links to the handler.
            let batch = got.iter().find(|s| {
                s.name == "raft.batch" && (s.parent == handler.id || s.links.contains(&handler.id))
            })?;
            Some((api.clone(), in_trace("raft.forward", follower)?, handler, batch.clone()))
        })();
        if let Some(f) = found {
            break f;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the write's spans did not all arrive: {:#?}",
            summary(&got)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let (api, forward, handler, batch) = found;
    // One trace, parent to child across the nodes.
    assert_eq!(api.trace.len(), 16);
    assert!(api.parent.is_empty(), "the API span is the root: {api:?}");
    assert_eq!(forward.parent, api.id, "the forward is the API call's child");
    assert_eq!(handler.parent, forward.id, "the leader continues the follower's forward");
    // Status and details.
    assert_eq!(api.attrs.get("rpc.grpc.status_code").map(String::as_str), Some("0"), "{api:?}");
    assert_eq!(api.status, 1, "OK: {api:?}");
    assert_eq!(forward.status, 1, "OK: {forward:?}");
    assert_eq!(batch.node, leader as i64);
    let size: usize = batch.attrs["batch.size"].parse().unwrap();
    assert_eq!(size, batch.links.len() + 1, "one link per proposal after the first: {batch:?}");
    let index: u64 = batch.attrs["raft.commit_index"].parse().unwrap();
    assert!(index > 0, "{batch:?}");

    // A failed call is an API span with an error status.
    let missing = common::cli(nodes.port(follower), &["vm", "get", "no-such-vm"]);
    assert!(!missing.status.success());
    eventually("the failed call's span", 30, || {
        let got = collector.0.lock().unwrap().clone();
        got.iter()
            .find(|s| s.node == follower as i64 && s.name == "blixard.v1.VmService/GetVm" && s.status == 2)
            .map(|s| assert_eq!(s.attrs["rpc.grpc.status_code"], "5", "NOT_FOUND: {s:?}"))
    });
    drop(nodes);
}

/// `node start` exporting to `url`, logging to `dir.log` like common's nodes.
fn traced_node(
    id: u64,
    port: u16,
    dir: &std::path::Path,
    join: Option<u16>,
    url: &str,
) -> std::process::Child {
    let mut cmd = node_command(id, port, dir, join, ["16", "8192", "100"], "none", &["--otlp-endpoint", url]);
    // Export every 200 ms, so the test need not wait for the default 5 s.
    cmd.env("OTEL_BSP_SCHEDULE_DELAY", "200");
    cmd.spawn().expect("spawn blixard node")
}
