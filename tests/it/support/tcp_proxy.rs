//! A TCP proxy that can hold back what the server sends: a real PostgreSQL connection whose
//! answer arrives late, for the races a slow lookup opens (the query has run on the server, its
//! result is on the wire, the client has not seen it yet).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct TcpProxy {
    pub addr: SocketAddr,
    hold: watch::Sender<bool>,
    /// Every byte held so far (for [`TcpProxy::held_contains`]).
    held_log: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = watch::channel(false).0;
        let held_log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (hold_rx, log_in) = (hold.subscribe(), held_log.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let (mut client_r, mut client_w) = client.into_split();
                let (mut server_r, mut server_w) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
                    let _ = server_w.shutdown().await;
                });
                let (mut hold, log) = (hold_rx.clone(), log_in.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if *hold.borrow_and_update() {
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                            while *hold.borrow_and_update() {
                                if hold.changed().await.is_err() {
                                    return;
                                }
                            }
                        }
                        if client_w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = client_w.shutdown().await;
                });
            }
        });
        TcpProxy { addr, hold, held_log }
    }

    /// While on, bytes from the server are held (and logged for [`TcpProxy::held_contains`]).
    pub fn hold_responses(&self, on: bool) {
        self.hold.send_replace(on);
    }

    /// Whether anything held since the start contains `needle` (on a connection without TLS,
    /// PostgreSQL's `CommandComplete` tag such as `SELECT 1` shows a statement ran).
    pub fn held_contains(&self, needle: &[u8]) -> bool {
        self.held_log.lock().unwrap().windows(needle.len()).any(|w| w == needle)
    }
}
