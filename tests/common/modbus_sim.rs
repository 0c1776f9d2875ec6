//! Modbus peers for tests and benchmarks: a register map served by tokio-modbus's own TCP and
//! RTU servers (real protocol stacks, not mocks); RTU runs over [`super::pty`] pairs.
//!
//! - [`Sim`]: units with sparse register maps; an address that is not in the map answers
//!   `IllegalDataAddress`; a unit marked silent (or absent) never answers, like a dead
//!   device or another unit's address on a shared bus.
//! - [`serve_tcp`] / [`serve_rtu`]: serve a [`Sim`] until dropped; `serve_rtu` on a serial
//!   stream, usually the device end (master) of a [`super::pty::PtyPair`].
//! - [`serve_converter`]: a serial-to-Ethernet converter in transparent mode: a TCP listener
//!   whose connection is piped byte for byte to a serial port (a pty pair's slave path), so
//!   an RTU server on the pair's master is "a TCP server that speaks RTU framing" (RTU over TCP).
//! - [`layout`]: an independent, spec-spelled byte layout ("CDAB" = the letters) for test
//!   data, so tests never check the codec against itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

/// One unit's data.
#[derive(Debug, Default, Clone)]
pub struct UnitData {
    pub holding: BTreeMap<u16, u16>,
    pub input: BTreeMap<u16, u16>,
    pub coils: BTreeMap<u16, bool>,
    pub discrete: BTreeMap<u16, bool>,
    /// Never answers while true.
    pub silent: bool,
}

/// A shared register map of several units.
#[derive(Clone, Default)]
pub struct Sim {
    pub units: Arc<Mutex<HashMap<u8, UnitData>>>,
    /// Requests answered, all units.
    pub requests: Arc<std::sync::atomic::AtomicU64>,
    /// Every write request received, in order, all units.
    pub writes: Arc<Mutex<Vec<Request<'static>>>>,
}

impl Sim {
    pub fn new() -> Sim {
        Sim::default()
    }

    /// Runs `f` on unit `id` (created if absent).
    pub fn with<R>(&self, id: u8, f: impl FnOnce(&mut UnitData) -> R) -> R {
        let mut u = self.units.lock().unwrap();
        f(u.entry(id).or_default())
    }

    pub fn set_holding(&self, id: u8, addr: u16, words: &[u16]) {
        self.with(id, |u| {
            for (i, w) in words.iter().enumerate() {
                u.holding.insert(addr + i as u16, *w);
            }
        })
    }

    pub fn holding(&self, id: u8, addr: u16, n: u16) -> Vec<Option<u16>> {
        self.with(id, |u| {
            (addr..addr + n)
                .map(|a| u.holding.get(&a).copied())
                .collect()
        })
    }

    pub fn set_silent(&self, id: u8, silent: bool) {
        self.with(id, |u| u.silent = silent)
    }

    fn answer(&self, req: SlaveRequest<'static>) -> Result<Option<Response>, ExceptionCode> {
        let mut units = self.units.lock().unwrap();
        let Some(u) = units.get_mut(&req.slave) else {
            return Ok(None);
        };
        if u.silent {
            return Ok(None);
        }
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if matches!(
            req.request,
            Request::WriteSingleCoil(..)
                | Request::WriteMultipleCoils(..)
                | Request::WriteSingleRegister(..)
                | Request::WriteMultipleRegisters(..)
        ) {
            self.writes.lock().unwrap().push(req.request.clone());
        }
        fn regs(m: &BTreeMap<u16, u16>, a: u16, n: u16) -> Result<Vec<u16>, ExceptionCode> {
            (a..a.saturating_add(n))
                .map(|x| m.get(&x).copied().ok_or(ExceptionCode::IllegalDataAddress))
                .collect()
        }
        fn bits(m: &BTreeMap<u16, bool>, a: u16, n: u16) -> Result<Vec<bool>, ExceptionCode> {
            (a..a.saturating_add(n))
                .map(|x| m.get(&x).copied().ok_or(ExceptionCode::IllegalDataAddress))
                .collect()
        }
        let r = match req.request {
            Request::ReadHoldingRegisters(a, n) => {
                Response::ReadHoldingRegisters(regs(&u.holding, a, n)?)
            }
            Request::ReadInputRegisters(a, n) => {
                Response::ReadInputRegisters(regs(&u.input, a, n)?)
            }
            Request::ReadCoils(a, n) => Response::ReadCoils(bits(&u.coils, a, n)?),
            Request::ReadDiscreteInputs(a, n) => {
                Response::ReadDiscreteInputs(bits(&u.discrete, a, n)?)
            }
            Request::WriteSingleRegister(a, w) => {
                if !u.holding.contains_key(&a) {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                u.holding.insert(a, w);
                Response::WriteSingleRegister(a, w)
            }
            Request::WriteMultipleRegisters(a, ws) => {
                for (i, w) in ws.iter().enumerate() {
                    let x = a + i as u16;
                    if !u.holding.contains_key(&x) {
                        return Err(ExceptionCode::IllegalDataAddress);
                    }
                    u.holding.insert(x, *w);
                }
                Response::WriteMultipleRegisters(a, ws.len() as u16)
            }
            Request::WriteSingleCoil(a, b) => {
                if !u.coils.contains_key(&a) {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                u.coils.insert(a, b);
                Response::WriteSingleCoil(a, b)
            }
            Request::WriteMultipleCoils(a, bs) => {
                let n = bs.len() as u16;
                if (a..a.saturating_add(n)).any(|x| !u.coils.contains_key(&x)) {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                for (i, b) in bs.iter().enumerate() {
                    u.coils.insert(a + i as u16, *b);
                }
                Response::WriteMultipleCoils(a, n)
            }
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        Ok(Some(r))
    }
}

impl tokio_modbus::server::Service for Sim {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        std::future::ready(self.answer(req))
    }
}

/// A running server; stops when dropped.
pub struct Served {
    pub port: u16,
    stop: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves `sim` over Modbus TCP on 127.0.0.1.
pub async fn serve_tcp(sim: Sim) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let on_connected = move |stream, _addr| {
            let sim = sim.clone();
            async move { Ok(Some((sim, stream))) }
        };
        let _ = server
            .serve_until(&on_connected, |_e| {}, async move { s2.cancelled().await })
            .await;
    });
    Served { port, stop }
}

/// Serves `sim` over Modbus RTU on `port` (e.g. [`super::pty::PtyPair::device`]).
pub fn serve_rtu(sim: Sim, port: tokio_serial::SerialStream) -> Served {
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        let server = tokio_modbus::server::rtu::Server::new(port);
        let _ = server
            .serve_until(sim, async move { s2.cancelled().await })
            .await;
    });
    Served { port: 0, stop }
}

/// A serial-to-Ethernet converter on 127.0.0.1 for the serial port `path`: one TCP
/// connection at a time is piped byte for byte to the port and back, until it closes; then
/// the next connection is accepted.
pub async fn serve_converter(path: &std::path::Path) -> Served {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut serial =
        tokio_serial::SerialStream::open(&tokio_serial::new(path.to_string_lossy(), 115_200))
            .expect("open the converter's end of the pty");
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        let (mut net, mut line) = ([0u8; 512], [0u8; 512]);
        loop {
            let mut tcp = tokio::select! {
                _ = s2.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
            };
            loop {
                tokio::select! {
                    _ = s2.cancelled() => return,
                    r = tcp.read(&mut net) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if serial.write_all(&net[..n]).await.is_err() {
                                return;
                            }
                        }
                    },
                    r = serial.read(&mut line) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let _ = tcp.write_all(&line[..n]).await;
                        }
                    },
                }
            }
        }
    });
    Served { port, stop }
}

/// Registers for big-endian value bytes `be` laid out as `order` spells it: wire byte `i`
/// carries value byte `order[i] - 'A'` (`"CDAB"`, `"GHEFCDAB"`, `"BA"`...).
pub fn layout(be: &[u8], order: &str) -> Vec<u16> {
    assert_eq!(be.len(), order.len(), "{order} for {} bytes", be.len());
    let wire: Vec<u8> = order.bytes().map(|c| be[(c - b'A') as usize]).collect();
    wire.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}
