//! A TCP proxy on loopback between the gateway and the cloud, which a test cuts and restores
//! to simulate a broken uplink (see [`Proxy`] for why the two sides are closed differently).
//! It logs every connection attempt it accepts (when, and whether it was let through), for
//! the fleet harness's attempts-per-second figures ([`Proxy::attempts`]); the log keeps the
//! first [`ATTEMPTS_LOGGED`] attempts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP proxy on loopback in front of the cloud. `cut()` closes every proxied connection
/// and refuses new ones until `restore()`.
///
/// A cut drops the gateway's side at once, as a broken link would. The cloud's side is
/// closed gracefully instead: FIN, then whatever the cloud still sends is read and discarded
/// until it closes too (bounded). Dropping it outright sends the cloud a reset whenever its
/// data sits unread in the proxy, and rumqttd 0.20 (the default cloud) cannot take a reset
/// between a CONNECT and its CONNACK: the failed CONNACK write ("Remote link error ...
/// Broken pipe") leaves that client id's will handler behind, the client's next CONNECT
/// panics on it (rumqttd src/server/broker.rs:544) and poisons the lock every later
/// connection takes, so the cloud refuses everyone for the rest of the test. The gateway
/// sees the same cut either way; only the cloud is spared a failure of its own.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    attempts: Arc<Mutex<Vec<Attempt>>>,
}

/// One connection the proxy accepted.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub at: Instant,
    /// Relayed to the cloud (false: closed at once, the link was cut).
    pub through: bool,
}

/// Most attempts [`Proxy::attempts`] keeps (later ones are not logged).
pub const ATTEMPTS_LOGGED: usize = 200_000;

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let (up2, conns2, stop2) = (up.clone(), conns.clone(), stop.clone());
        let attempts2 = attempts.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                // The token first: a cut between the two checks then still reaches this
                // connection (checked the other way round it could take the new token and
                // outlive the cut).
                let token = conns2.lock().unwrap().clone();
                let through = up2.load(Ordering::SeqCst);
                {
                    let mut log = attempts2.lock().unwrap();
                    if log.len() < ATTEMPTS_LOGGED {
                        log.push(Attempt {
                            at: Instant::now(),
                            through,
                        });
                    }
                }
                if !through {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    // A relay of small MQTT packets: with Nagle on, each write waits for the
                    // peer's (delayed) ACK, which capped the bridge bench at ~15-25k msg/s.
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let cut = tokio::select! {
                        _ = token.cancelled() => true,
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                    };
                    drop(inbound);
                    if cut {
                        close_gracefully(outbound).await;
                    }
                });
            }
        });
        Proxy {
            port,
            up,
            conns,
            stop,
            attempts,
        }
    }

    /// Every connection accepted so far, in order (the first [`ATTEMPTS_LOGGED`]).
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }

    /// Cuts the link: open connections are closed, new ones refused.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut t = self.conns.lock().unwrap();
        t.cancel();
        *t = CancellationToken::new();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Most time a cut waits for the cloud to close its side.
const CLOUD_CLOSE: Duration = Duration::from_secs(5);

/// Sends FIN on `s` and reads (discarding) until the peer closes, within [`CLOUD_CLOSE`].
async fn close_gracefully(mut s: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(CLOUD_CLOSE, async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.conns.lock().unwrap().cancel();
    }
}
