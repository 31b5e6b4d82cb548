//! `vm console NAME`: the VM's interactive serial console, through any
//! member (it forwards to the node that runs the VM).
//!
//! On a terminal: raw mode, every key goes to the guest, Ctrl-] detaches.
//! With stdin not a terminal: stdin is sent as it is read, output printed;
//! once stdin ends, it waits until the guest has been quiet for
//! `--idle-timeout` seconds (so a script's last command can answer), then
//! detaches.
use std::io::{Read, Write};
use std::time::Duration;

use blixard_proto as pb;

use crate::client::Client;
use crate::Failure;

/// Ctrl-]: detach, as telnet and virsh do.
const DETACH: u8 = 0x1d;

/// The terminal in raw mode until dropped.
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> Result<RawMode, Failure> {
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return Err(Failure::new(format!(
                "cannot read the terminal's mode: {}",
                std::io::Error::last_os_error()
            )));
        }
        let saved = t;
        // SAFETY: cfmakeraw only edits the struct; tcsetattr applies it.
        unsafe { libc::cfmakeraw(&mut t) };
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            return Err(Failure::new(format!(
                "cannot put the terminal in raw mode: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the mode read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

pub async fn run(c: &mut Client, name: String, idle_timeout: Duration) -> Result<(), Failure> {
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(0) } == 1;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ConsoleInput>(16);
    tx.send(pb::ConsoleInput { name: name.clone(), data: Vec::new() })
        .await
        .map_err(|_| Failure::new("console input closed".to_string()))?;
    let mut output = c.vm_console(rx).await?;
    let raw = if tty {
        let raw = RawMode::enter()?;
        eprint!("connected to the console of {name}; detach with Ctrl-]\r\n");
        Some(raw)
    } else {
        None
    };
    // Stdin, as it comes; `None` once it ends (or, on a terminal, at
    // Ctrl-]).
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    // A thread of its own: a read of stdin blocks, and may outlive the
    // console (the process exits then).
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            if n == 0 {
                let _ = in_tx.blocking_send(None);
                return;
            }
            let data = &buf[..n];
            if tty {
                if let Some(at) = data.iter().position(|&b| b == DETACH) {
                    if at > 0 {
                        let _ = in_tx.blocking_send(Some(data[..at].to_vec()));
                    }
                    let _ = in_tx.blocking_send(None);
                    return;
                }
            }
            if in_tx.blocking_send(Some(data.to_vec())).is_err() {
                return;
            }
        }
    });
    let mut stdout = std::io::stdout();
    let mut input_done = false;
    let result = loop {
        let idle = async {
            if input_done {
                tokio::time::sleep(idle_timeout).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            m = output.message() => match m {
                Ok(Some(out)) => {
                    if stdout.write_all(&out.data).and_then(|()| stdout.flush()).is_err() {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(s) => break Err(Failure::new(format!("console of {name}: {}", s.message()))),
            },
            i = in_rx.recv(), if !input_done => match i {
                Some(Some(data)) => {
                    if tx.send(pb::ConsoleInput { name: String::new(), data }).await.is_err() {
                        break Ok(());
                    }
                }
                // Detached (terminal) or stdin ended (script).
                Some(None) | None => {
                    if tty {
                        break Ok(());
                    }
                    input_done = true;
                }
            },
            () = idle => break Ok(()),
        }
    };
    drop(raw);
    if tty {
        eprintln!("\ndetached from the console of {name}");
    }
    result
}
