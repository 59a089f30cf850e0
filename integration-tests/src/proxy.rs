//! A TCP proxy in front of one service process that the test controls: it forwards, or holds
//! every byte back for a while (delay), or cuts every connection and refuses new ones
//! (partition). Replicas behind proxies are known to everyone (Raft peers, clients) by the
//! proxy's address, so a fault here is a fault of the network between them.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::{Result, io_error};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every chunk waits this long before it is forwarded.
    Delay(Duration),
    /// Existing connections are cut and new ones refused.
    Partition,
}

pub struct FaultProxy {
    pub address: String,
    fault: Arc<watch::Sender<Fault>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: String) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io_error("binding a proxy"))?;
        let address = listener
            .local_addr()
            .map_err(io_error("reading a proxy's address"))?
            .to_string();
        let (fault, _) = watch::channel(Fault::None);
        let fault = Arc::new(fault);
        let accepting = tokio::spawn({
            let fault = Arc::clone(&fault);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *fault.borrow() == Fault::Partition {
                        continue;
                    }
                    tokio::spawn(forward(client, target.clone(), fault.subscribe()));
                }
            }
        });
        Ok(FaultProxy {
            address,
            fault,
            accepting,
        })
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

async fn forward(client: TcpStream, target: String, fault: watch::Receiver<Fault>) {
    let Ok(server) = TcpStream::connect(&target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pipe(client_read, server_write, fault.clone()) => {}
        () = pipe(server_read, client_write, fault) => {}
    }
}

/// Copies one direction until either side closes or a partition starts.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = fault.wait_for(|fault| *fault == Fault::Partition) => {
                let _ = changed;
                return;
            }
        };
        let Ok(read @ 1..) = read else {
            return;
        };
        let current = *fault.borrow();
        match current {
            Fault::Partition => return,
            Fault::Delay(delay) => tokio::time::sleep(delay).await,
            Fault::None => {}
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
