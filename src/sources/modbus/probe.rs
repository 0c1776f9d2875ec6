//! `fieldgate modbus probe`: read a range once and print it decoded in every type and order,
//! side by side, so the settings for an unknown device can be read off in one go.
//!
//! Owns the command's arguments and its output format. [`render`] is pure (tested); [`run`]
//! does the one request with the same bounded [`Lane`] the gateway uses.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use super::bus::{self, Answer, Endpoint, Lane, Unit};
use super::codec::{self, DataType, Format, Order};
use super::config::{Parity, RegisterKind};
use crate::sources::modbus::metrics::ModbusMetrics;

/// Arguments of `fieldgate modbus probe`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("transport").required(true).args(["tcp", "rtu", "rtu_over_tcp"])))]
pub struct ProbeArgs {
    /// Modbus TCP device, host:port.
    #[arg(long, value_name = "HOST:PORT")]
    pub tcp: Option<String>,
    /// Modbus RTU serial port, e.g. /dev/ttyUSB0.
    #[arg(long, value_name = "PATH")]
    pub rtu: Option<String>,
    /// Modbus RTU frames over TCP: a serial-to-Ethernet converter in transparent mode,
    /// host:port.
    #[arg(long, value_name = "HOST:PORT")]
    pub rtu_over_tcp: Option<String>,
    /// RTU baud rate.
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    /// RTU parity: none, even, odd.
    #[arg(long, default_value = "none", value_parser = parse_parity)]
    pub parity: Parity,
    /// RTU data bits.
    #[arg(long, default_value_t = 8)]
    pub data_bits: u8,
    /// RTU stop bits.
    #[arg(long, default_value_t = 1)]
    pub stop_bits: u8,
    /// Unit (slave) id.
    #[arg(long, default_value_t = 1)]
    pub unit: u8,
    /// holding, input, coil or discrete.
    #[arg(long, default_value = "holding", value_parser = parse_kind)]
    pub kind: RegisterKind,
    /// First address (0-based, as on the wire).
    #[arg(long)]
    pub address: u16,
    /// Registers (or coils) to read, 1..=125 (coils 1..=2000).
    #[arg(long, default_value_t = 4)]
    pub count: u16,
    /// Answer timeout.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn parse_parity(s: &str) -> Result<Parity, String> {
    match s {
        "none" | "N" | "n" => Ok(Parity::None),
        "even" | "E" | "e" => Ok(Parity::Even),
        "odd" | "O" | "o" => Ok(Parity::Odd),
        _ => Err(format!("{s:?}: use none, even or odd")),
    }
}

fn parse_kind(s: &str) -> Result<RegisterKind, String> {
    match s {
        "holding" | "holding_register" => Ok(RegisterKind::HoldingRegister),
        "input" | "input_register" => Ok(RegisterKind::InputRegister),
        "coil" | "coils" => Ok(RegisterKind::Coil),
        "discrete" | "discrete_input" => Ok(RegisterKind::DiscreteInput),
        _ => Err(format!("{s:?}: use holding, input, coil or discrete")),
    }
}

/// Why the probe printed no table. `main` prints it and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The arguments cannot make a valid request; fix them.
    #[error("{0}")]
    Usage(String),
    /// The device did not answer usefully; check address, unit id, line settings.
    #[error("{0}")]
    Device(String),
}

/// Reads the range and returns the table.
pub async fn run(args: &ProbeArgs) -> Result<String, ProbeError> {
    let limit = if args.kind.is_bit() { 2000 } else { 125 };
    if args.count == 0 || args.count > limit {
        return Err(ProbeError::Usage(format!(
            "--count must be 1..={limit} for {}",
            args.kind.as_str()
        )));
    }
    if u32::from(args.address) + u32::from(args.count) > 65536 {
        return Err(ProbeError::Usage(
            "--address + --count runs past 65535".into(),
        ));
    }
    let (ep, what) = match (&args.tcp, &args.rtu) {
        (Some(h), _) => (Endpoint::Tcp(h.clone()), h.clone()),
        (None, None) if args.rtu_over_tcp.is_some() => {
            let h = args.rtu_over_tcp.clone().unwrap_or_default();
            (
                Endpoint::RtuOverTcp(h.clone()),
                format!("{h} (RTU over TCP)"),
            )
        }
        (None, Some(p)) => (
            Endpoint::Rtu {
                path: p.clone(),
                baud: args.baud,
                parity: args.parity,
                data_bits: args.data_bits,
                stop_bits: args.stop_bits,
            },
            format!("{p} at {} baud", args.baud),
        ),
        (None, None) => {
            return Err(ProbeError::Usage(
                "give --tcp, --rtu or --rtu-over-tcp".into(),
            ))
        }
    };
    let unit = Unit {
        name: "probe".into(),
        id: args.unit,
        timeout: args.timeout,
        retries: 0,
        request_delay: Duration::ZERO,
        gap: Duration::from_millis(2),
    };
    let metrics: Arc<ModbusMetrics> = ModbusMetrics::new();
    let mut lane = Lane::default();
    let req = bus::read_request(args.kind, args.address, args.count);
    let answer = lane
        .request(&ep, &unit, &req, 1, &metrics)
        .await
        .map_err(|e| ProbeError::Device(format!("{what} unit {}: {e}", args.unit)))?;
    use tokio_modbus::Response;
    let header = format!(
        "{} {}..{} of unit {} on {what}\n\n",
        args.kind.as_str(),
        args.address,
        u32::from(args.address) + u32::from(args.count),
        args.unit
    );
    match answer {
        Answer::Exception(code) => Err(ProbeError::Device(format!(
            "{what} unit {} answered {}",
            args.unit,
            bus::exception_text(code)
        ))),
        Answer::Data(Response::ReadHoldingRegisters(w))
        | Answer::Data(Response::ReadInputRegisters(w)) => Ok(header + &render(args.address, &w)),
        Answer::Data(Response::ReadCoils(b)) | Answer::Data(Response::ReadDiscreteInputs(b)) => {
            let mut s = header;
            for (i, v) in b.iter().take(usize::from(args.count)).enumerate() {
                let _ = writeln!(
                    s,
                    "{:>5}  {}",
                    u32::from(args.address) + i as u32,
                    u8::from(*v)
                );
            }
            Ok(s)
        }
        Answer::Data(other) => Err(ProbeError::Device(format!("unexpected answer {other:?}"))),
    }
}

fn num(v: codec::Value) -> String {
    match v {
        // The same shortest decimal as the MQTT payload (the codec removed f32 noise); very
        // small or large numbers in exponent form so the table stays readable.
        codec::Value::F64(x) if x != 0.0 && (x.abs() < 1e-4 || x.abs() >= 1e10) => {
            format!("{x:e}")
        }
        codec::Value::F64(x) => format!("{x}"),
        other => other.to_string(),
    }
}

/// The table for registers `w` read from `address`.
pub fn render(address: u16, w: &[u16]) -> String {
    let mut s = String::new();
    let a = |i: usize| u32::from(address) + i as u32;
    let _ = writeln!(
        s,
        "16-bit      hex     AB u16   AB i16   BA u16   BA i16  text  bits 15..0"
    );
    for (i, r) in w.iter().enumerate() {
        let d = |ty, o| {
            num(codec::decode(&Format::new(ty, o), &[*r]).unwrap_or(codec::Value::Str("-".into())))
        };
        let text: String = r
            .to_be_bytes()
            .iter()
            .map(|b| {
                if b.is_ascii_graphic() || *b == b' ' {
                    *b as char
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(
            s,
            "{:>5}    0x{r:04x} {:>9} {:>8} {:>8} {:>8}   {text:2}  {r:016b}",
            a(i),
            d(DataType::U16, Order::Abcd),
            d(DataType::I16, Order::Abcd),
            d(DataType::U16, Order::Dcba),
            d(DataType::I16, Order::Dcba),
        );
    }
    for (regs, types, width) in [
        (
            2usize,
            [DataType::U32, DataType::I32, DataType::F32],
            16usize,
        ),
        (4, [DataType::U64, DataType::I64, DataType::F64], 22),
    ] {
        if w.len() < regs {
            continue;
        }
        let bytes = regs * 2;
        let _ = write!(s, "\n{:<2}-bit    ", bytes * 8);
        for o in [Order::Abcd, Order::Cdab, Order::Badc, Order::Dcba] {
            let _ = write!(s, "{:>width$}", o.spelling(bytes));
        }
        s.push('\n');
        for i in 0..=w.len() - regs {
            for ty in types {
                let _ = write!(s, "{:>5} {ty:<4}", a(i));
                for o in [Order::Abcd, Order::Cdab, Order::Badc, Order::Dcba] {
                    let v = codec::decode(&Format::new(ty, o), &w[i..i + regs])
                        .map(num)
                        .unwrap_or_else(|_| "-".into());
                    let _ = write!(s, "{v:>width$}");
                }
                s.push('\n');
            }
        }
    }
    for o in [Order::Abcd, Order::Badc] {
        let raw: Vec<u8> = w
            .iter()
            .flat_map(|r| {
                let b = r.to_be_bytes();
                if o == Order::Badc {
                    [b[1], b[0]]
                } else {
                    b
                }
            })
            .collect();
        let text: String = raw
            .iter()
            .map(|b| {
                if b.is_ascii_graphic() || *b == b' ' {
                    *b as char
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(
            s,
            "\nstring {}  {text:?}",
            if o == Order::Abcd {
                "high byte first (ABCD)"
            } else {
                "low byte first (BADC) "
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_every_order() {
        // 25.0f32 = 0x41c8_0000, then "AB".
        let t = render(100, &[0x41c8, 0x0000, 0x4142]);
        assert!(t.contains("  100    0x41c8"), "{t}");
        // 25 in ABCD, and the same registers read word-swapped.
        let f32_row = t
            .lines()
            .find(|l| l.starts_with("  100 f32"))
            .expect("f32 row");
        assert!(f32_row.contains(" 25 "), "{f32_row}");
        assert!(
            t.contains("ABCD") && t.contains("CDAB") && t.contains("BADC") && t.contains("DCBA")
        );
        assert!(t.contains("\"A.."), "{t}");
        assert!(
            !t.contains("ABCDEFGH"),
            "3 registers hold no 64-bit value:\n{t}"
        );
        let t = render(0, &[0, 0, 0, 1]);
        assert!(t.contains("ABCDEFGH") && t.contains("GHEFCDAB"), "{t}");
    }
}
