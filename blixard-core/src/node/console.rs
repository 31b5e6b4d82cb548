//! `VmConsole`: the interactive serial console of a VM, attached through
//! any node. The node that runs the VM opens it on its backend (one
//! console per VM at a time) and pipes it both ways: each input message's
//! bytes to the guest's serial input, the guest's output, as it comes, to
//! the client. Another node forwards the whole stream there, once (like
//! `FollowVmLogs`, see `logs.rs`).
//!
//! It ends when the client closes its side (the console is released), when
//! the guest's console closes (the VM stopped), or when the node shuts down.
use std::pin::Pin;
use std::sync::Arc;

use blixard_proto as pb;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Status};

use super::logs::{locate, Console};
use super::NodeShared;

/// Console output is sent in chunks of at most this many bytes.
const CHUNK: usize = 16 * 1024;
/// Output messages buffered before the reader waits for the client.
const STREAM_BUFFER: usize = 16;

pub type ConsoleStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::ConsoleOutput, Status>> + Send + 'static>>;
/// The input a node forwards to the owning node: fed by a task from the
/// client's stream. (A concrete type: tonic's client-streaming call with a
/// boxed `dyn Stream` cannot be proven `Send` inside a service method.)
pub struct InputRx(tokio::sync::mpsc::Receiver<pb::ConsoleInput>);

impl futures::Stream for InputRx {
    type Item = pb::ConsoleInput;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<pb::ConsoleInput>> {
        self.0.poll_recv(cx)
    }
}

/// The client's input messages, ending at its end of stream or first
/// error. (A named adapter rather than stream combinators with closures:
/// the compiler can prove it `Send` across the awaits below.)
struct Messages<S>(Option<S>);

impl<S> futures::Stream for Messages<S>
where
    S: futures::Stream<Item = Result<pb::ConsoleInput, Status>> + Unpin,
{
    type Item = pb::ConsoleInput;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<pb::ConsoleInput>> {
        let Some(inner) = self.0.as_mut() else { return std::task::Poll::Ready(None) };
        match inner.poll_next_unpin(cx) {
            std::task::Poll::Ready(Some(Ok(m))) => std::task::Poll::Ready(Some(m)),
            std::task::Poll::Ready(_) => {
                self.0 = None;
                std::task::Poll::Ready(None)
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// A backend's console error as a status.
fn status_of(e: blixard_vm::VmError) -> Status {
    use blixard_vm::VmError as E;
    match e {
        E::NotFound(_) => Status::not_found(e.to_string()),
        E::Busy(_) => Status::resource_exhausted(e.to_string()),
        E::Config(_) | E::Unavailable(_) | E::Failed(_) => Status::failed_precondition(e.to_string()),
        E::Io { .. } => Status::unavailable(e.to_string()),
    }
}

/// Attaches the console named by the first message of `input`.
/// `forwarded`: another node sent the call here; `mark` makes the request
/// this node forwards.
pub async fn attach<S>(
    node: Arc<NodeShared>,
    mut input: S,
    forwarded: bool,
    mark: impl FnOnce(InputRx) -> Request<InputRx>,
) -> Result<ConsoleStream, Status>
where
    S: futures::Stream<Item = Result<pb::ConsoleInput, Status>> + Send + Unpin + 'static,
{
    let first = match input.next().await {
        Some(m) => m?,
        None => return Err(Status::invalid_argument("the first console message names the VM")),
    };
    let name = first.name.clone();
    if name.is_empty() {
        return Err(Status::invalid_argument("the first console message names the VM"));
    }
    // The client's input, as plain messages: it ends at the client's end
    // of stream or first error.
    let rest = Messages(Some(input));
    match locate(&node, &name, forwarded)? {
        Console::There(mut client, _) => {
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
            tokio::spawn(async move {
                let mut rest = rest;
                if tx.send(first).await.is_err() {
                    return;
                }
                while let Some(m) = rest.next().await {
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
            });
            let upstream = client.vm_console(mark(InputRx(rx))).await?.into_inner();
            Ok(Box::pin(upstream))
        }
        Console::Here(backend) => {
            let io = backend.console(&name).await.map_err(status_of)?;
            tracing::info!(vm = %name, "console attached");
            let (mut rd, mut wr) = tokio::io::split(io);
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
            // Input: the first message's bytes, then each message's.
            let writer = tokio::spawn(async move {
                let mut input = Box::pin(futures::stream::once(async move { first }).chain(rest));
                while let Some(m) = input.next().await {
                    if !m.data.is_empty()
                        && (wr.write_all(&m.data).await.is_err() || wr.flush().await.is_err())
                    {
                        break;
                    }
                }
            });
            let me = node.id;
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let read = tokio::select! {
                        r = rd.read(&mut buf) => r,
                        _ = tx.closed() => break,
                        () = super::logs::closing(&node) => {
                            let _ = tx.send(Err(Status::unavailable(format!("node {me} is shutting down")))).await;
                            break;
                        }
                    };
                    match read {
                        Ok(0) => {
                            let why = format!("VM {name:?}'s console closed (the VM stopped)");
                            let _ = tx.send(Err(Status::failed_precondition(why))).await;
                            break;
                        }
                        Ok(n) => {
                            if tx.send(Ok(pb::ConsoleOutput { data: buf[..n].to_vec() })).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ =
                                tx.send(Err(Status::unavailable(format!("console of {name:?}: {e}")))).await;
                            break;
                        }
                    }
                }
                // Dropping both halves releases the console for the next
                // client.
                writer.abort();
                tracing::info!(vm = %name, "console detached");
            });
            Ok(Box::pin(futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            )))
        }
    }
}
