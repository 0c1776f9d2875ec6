//! Modbus value codec: registers and bits to typed values and back. Pure, no I/O.
//!
//! Owns the meaning of a tag's `type`, `order`, `bit`, `length`, `count`, `scale`, `offset`
//! and `decimals`. A coil or discrete-input tag of `count` > 1 is that many consecutive bits,
//! a [`Value::Bools`] (JSON `[true,false,..]`), written whole as [`Encoded::Coils`].
//!
//! Byte order: a value of `W` bytes (2, 4 or 8) is written `A B C D ...` from its most
//! significant byte down. The [`Order`] says which value byte travels in each wire byte
//! position, the wire being register 0 high byte, register 0 low byte, register 1 high byte, ...
//! The four orders are named by their 32-bit spelling; the 64-bit and 16-bit spellings name
//! the same rule (`CDAB` = `GHEFCDAB` = word swap, 16-bit: `AB`/`CDAB` keep, `BA`/`BADC`/`DCBA`
//! swap the two bytes). Strings are read high byte first (`ABCD`, `CDAB`) or low byte first
//! (`BADC`, `DCBA`) within each register; registers are never reordered for strings.
//!
//! Invariants:
//! - `decode(encode(v)) == v` for every representable `v` (the property test below);
//! - [`encode`] never wraps or truncates: a value that does not fit the register type is a
//!   precise [`CodecError`], never a silently different number;
//! - engineering value = raw x scale + offset; integer types with scale 1 and offset 0 stay
//!   exact integers (u64 and i64 included), everything else is an `f64`;
//! - no binary noise: an f32 becomes the `f64` of the shortest decimal that reads back as
//!   the same f32 (`3.1415927`, never `3.1415927410125732`), and a scaled value is rounded
//!   to the decimals the computation implies (the raw value's decimals plus the scale's,
//!   at least the offset's: raw 3 x 0.1 is `0.3`), or to the tag's `decimals` when set.
//!   An `f64` prints (Display, JSON) as its shortest decimal, so the probe and MQTT show the
//!   same digits.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Register data type of a tag (`type = "..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// A coil or discrete input.
    Bool,
    /// One bit (`bit = 0..15`, 0 = least significant) of a register.
    Bit,
    /// Unsigned 16-bit, one register.
    U16,
    /// Signed 16-bit, one register.
    I16,
    /// Unsigned 32-bit, two registers.
    U32,
    /// Signed 32-bit, two registers.
    I32,
    /// Unsigned 64-bit, four registers.
    U64,
    /// Signed 64-bit, four registers.
    I64,
    /// IEEE 754 single, two registers.
    F32,
    /// IEEE 754 double, four registers.
    F64,
    /// Fixed-length text of `length` bytes, two per register, NUL padded.
    String,
}

impl DataType {
    /// Every type, for the probe and the tests.
    pub const ALL: [DataType; 11] = [
        DataType::Bool,
        DataType::Bit,
        DataType::U16,
        DataType::I16,
        DataType::U32,
        DataType::I32,
        DataType::U64,
        DataType::I64,
        DataType::F32,
        DataType::F64,
        DataType::String,
    ];

    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::Bit => "bit",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::String => "string",
        }
    }

    /// Bytes of a numeric value (0 for bool, bit and string).
    pub fn width(self) -> usize {
        match self {
            DataType::U16 | DataType::I16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bool | DataType::Bit | DataType::String => 0,
        }
    }

    fn is_integer(self) -> bool {
        matches!(
            self,
            DataType::U16
                | DataType::I16
                | DataType::U32
                | DataType::I32
                | DataType::U64
                | DataType::I64
        )
    }

    fn is_signed(self) -> bool {
        matches!(self, DataType::I16 | DataType::I32 | DataType::I64)
    }

    /// Raw integer range as `(min, max)`.
    fn int_range(self) -> (i128, i128) {
        match self {
            DataType::U16 => (0, u16::MAX as i128),
            DataType::I16 => (i16::MIN as i128, i16::MAX as i128),
            DataType::U32 => (0, u32::MAX as i128),
            DataType::I32 => (i32::MIN as i128, i32::MAX as i128),
            DataType::U64 => (0, u64::MAX as i128),
            DataType::I64 => (i64::MIN as i128, i64::MAX as i128),
            _ => (0, 1),
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Byte/word order of a multi-byte value (`order = "ABCD"`), see the module header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum Order {
    /// Big endian: `AB`, `ABCD`, `ABCDEFGH`.
    #[default]
    Abcd,
    /// Little endian: `BA`, `DCBA`, `HGFEDCBA`.
    Dcba,
    /// Bytes swapped inside each register: `BADC`, `BADCFEHG`.
    Badc,
    /// Registers in reverse order, bytes kept: `CDAB`, `GHEFCDAB`.
    Cdab,
}

impl Order {
    /// Every order.
    pub const ALL: [Order; 4] = [Order::Abcd, Order::Dcba, Order::Badc, Order::Cdab];

    /// The spelling for a value of `width` bytes.
    pub fn spelling(self, width: usize) -> &'static str {
        match (self, width) {
            (Order::Abcd | Order::Cdab, 2) => "AB",
            (Order::Dcba | Order::Badc, 2) => "BA",
            (Order::Abcd, 8) => "ABCDEFGH",
            (Order::Dcba, 8) => "HGFEDCBA",
            (Order::Badc, 8) => "BADCFEHG",
            (Order::Cdab, 8) => "GHEFCDAB",
            (Order::Abcd, _) => "ABCD",
            (Order::Dcba, _) => "DCBA",
            (Order::Badc, _) => "BADC",
            (Order::Cdab, _) => "CDAB",
        }
    }

    /// Index of the value byte carried by wire byte `i` of a `width`-byte value.
    fn source(self, i: usize, width: usize) -> usize {
        match self {
            Order::Abcd => i,
            Order::Dcba => width - 1 - i,
            Order::Badc => i ^ 1,
            Order::Cdab => {
                let regs = width / 2;
                (regs - 1 - i / 2) * 2 + i % 2
            }
        }
    }

    /// Puts big-endian value bytes on the wire.
    fn value_to_wire(self, value_be: &[u8]) -> Vec<u8> {
        let w = value_be.len();
        (0..w).map(|i| value_be[self.source(i, w)]).collect()
    }

    /// Takes wire bytes back to big-endian value bytes.
    fn wire_to_value(self, wire: &[u8]) -> Vec<u8> {
        let w = wire.len();
        let mut out = vec![0; w];
        for (i, b) in wire.iter().enumerate() {
            out[self.source(i, w)] = *b;
        }
        out
    }

    fn swaps_string_bytes(self) -> bool {
        matches!(self, Order::Badc | Order::Dcba)
    }
}

impl TryFrom<String> for Order {
    type Error = String;
    fn try_from(s: String) -> Result<Order, String> {
        match s.to_ascii_uppercase().as_str() {
            "AB" | "ABCD" | "ABCDEFGH" => Ok(Order::Abcd),
            "BA" | "DCBA" | "HGFEDCBA" => Ok(Order::Dcba),
            "BADC" | "BADCFEHG" => Ok(Order::Badc),
            "CDAB" | "GHEFCDAB" => Ok(Order::Cdab),
            _ => Err(format!(
                "unknown order {s:?}; use ABCD, DCBA, BADC or CDAB (64-bit: ABCDEFGH, HGFEDCBA, \
                 BADCFEHG, GHEFCDAB)"
            )),
        }
    }
}

impl From<Order> for String {
    fn from(o: Order) -> String {
        o.spelling(4).to_string()
    }
}

/// How one tag's registers map to a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Format {
    /// Data type.
    pub ty: DataType,
    /// Byte/word order.
    pub order: Order,
    /// Bit number for [`DataType::Bit`].
    pub bit: u8,
    /// Bytes for [`DataType::String`].
    pub length: u16,
    /// Engineering value = raw x scale + offset.
    pub scale: f64,
    /// See `scale`.
    pub offset: f64,
    /// Decimals of a published float or scaled value; `None`: implied (module header).
    pub decimals: Option<u8>,
    /// Coils or discrete inputs of a [`DataType::Bool`] tag (1: a single `bool`).
    pub count: u16,
}

impl Format {
    /// A plain format (scale 1, offset 0).
    pub fn new(ty: DataType, order: Order) -> Format {
        Format {
            ty,
            order,
            bit: 0,
            length: 0,
            scale: 1.0,
            offset: 0.0,
            decimals: None,
            count: 1,
        }
    }

    /// Registers (or coils, for bool) the value occupies.
    pub fn registers(&self) -> u16 {
        match self.ty {
            DataType::Bool => self.count.max(1),
            DataType::Bit => 1,
            DataType::String => self.length.div_ceil(2),
            t => (t.width() / 2) as u16,
        }
    }

    fn scaled(&self) -> bool {
        self.scale != 1.0 || self.offset != 0.0
    }
}

/// A decoded tag value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Coil, discrete input or bit.
    Bool(bool),
    /// Unsigned integer, exact.
    U64(u64),
    /// Signed integer, exact.
    I64(i64),
    /// Float, or a scaled integer.
    F64(f64),
    /// Text.
    Str(String),
    /// Several coils or discrete inputs, lowest address first.
    Bools(Vec<bool>),
}

impl Value {
    /// As JSON. A non-finite float becomes `null` (JSON has no NaN).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Bool(b) => (*b).into(),
            Value::U64(v) => (*v).into(),
            Value::I64(v) => (*v).into(),
            Value::F64(v) => serde_json::Number::from_f64(*v)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => s.clone().into(),
            Value::Bools(v) => v.clone().into(),
        }
    }

    /// As a number, for deadband comparisons.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            Value::Str(_) | Value::Bools(_) => None,
        }
    }

    /// Whether the value can be published as a number (false for NaN and infinities).
    pub fn is_finite(&self) -> bool {
        !matches!(self, Value::F64(v) if !v.is_finite())
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Bools(_) => write!(f, "{}", self.to_json()),
        }
    }
}

/// What a write puts on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// One coil.
    Coil(bool),
    /// One bit of a holding register (read-modify-write).
    Bit {
        /// Bit number, 0 = least significant.
        bit: u8,
        /// New state.
        value: bool,
    },
    /// Whole registers, in wire order.
    Registers(Vec<u16>),
    /// Several coils from the tag's address on (function 15).
    Coils(Vec<bool>),
}

/// Why a value could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The device returned fewer registers than the type needs. The caller reports the read
    /// as a bad frame.
    #[error("{got} register(s) for a {ty} value that needs {need}")]
    Short {
        /// The tag's type.
        ty: DataType,
        /// Registers needed.
        need: usize,
        /// Registers given.
        got: usize,
    },
    /// A write value is outside what the type can hold (after scale and offset). The caller
    /// answers the writer with this message; nothing is written.
    #[error("out of range: {value} is outside {ty} [{min}, {max}]")]
    OutOfRange {
        /// The requested engineering value.
        value: String,
        /// The tag's type.
        ty: DataType,
        /// Smallest engineering value that fits.
        min: String,
        /// Largest engineering value that fits.
        max: String,
    },
    /// A write value falls between two representable values of a scaled integer. The caller
    /// answers the writer; nothing is written.
    #[error("not representable: {value} is not a multiple of scale {scale} from offset {offset}")]
    NotRepresentable {
        /// The requested engineering value.
        value: String,
        /// The tag's scale.
        scale: f64,
        /// The tag's offset.
        offset: f64,
    },
    /// A write value has the wrong JSON type for the tag. The caller answers the writer.
    #[error("wrong value type: a {ty} tag takes {want}, got {got}")]
    WrongType {
        /// The tag's type.
        ty: DataType,
        /// What it accepts.
        want: &'static str,
        /// What was sent.
        got: String,
    },
    /// A multi-coil write does not have one value per coil. The caller answers the writer;
    /// nothing is written.
    #[error("wrong number of values: {got} for a tag of count {count}; send an array of {count} booleans")]
    Count {
        /// Values sent.
        got: usize,
        /// The tag's count.
        count: u16,
    },
    /// A string write is longer than the tag's `length`. The caller answers the writer.
    #[error("too long: {len} bytes for a string tag of length {length}")]
    TooLong {
        /// Bytes sent.
        len: usize,
        /// The tag's length.
        length: u16,
    },
}

/// Decodes a coil or discrete input.
pub fn decode_bool(bits: &[bool]) -> Result<Value, CodecError> {
    bits.first()
        .map(|b| Value::Bool(*b))
        .ok_or(CodecError::Short {
            ty: DataType::Bool,
            need: 1,
            got: 0,
        })
}

/// Decodes a coil or discrete-input tag of format `fmt` from `bits` (starting at the tag's
/// address): a `bool`, or `count` of them when `count` > 1.
pub fn decode_bits(fmt: &Format, bits: &[bool]) -> Result<Value, CodecError> {
    if fmt.count <= 1 {
        return decode_bool(bits);
    }
    let n = usize::from(fmt.count);
    bits.get(..n)
        .map(|b| Value::Bools(b.to_vec()))
        .ok_or(CodecError::Short {
            ty: DataType::Bool,
            need: n,
            got: bits.len(),
        })
}

/// Decodes a register-based value from `regs` (wire order, starting at the tag's address).
pub fn decode(fmt: &Format, regs: &[u16]) -> Result<Value, CodecError> {
    let need = usize::from(fmt.registers());
    if regs.len() < need {
        return Err(CodecError::Short {
            ty: fmt.ty,
            need,
            got: regs.len(),
        });
    }
    let regs = &regs[..need];
    let wire: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
    let v = match fmt.ty {
        DataType::Bool => Value::Bool(regs[0] != 0),
        DataType::Bit => Value::Bool(regs[0] >> (fmt.bit & 15) & 1 == 1),
        DataType::String => {
            let mut bytes = wire;
            if fmt.order.swaps_string_bytes() {
                for pair in bytes.chunks_mut(2) {
                    pair.swap(0, 1);
                }
            }
            bytes.truncate(usize::from(fmt.length));
            let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
            bytes.truncate(end);
            Value::Str(String::from_utf8_lossy(&bytes).into_owned())
        }
        ty => {
            let be = fmt.order.wire_to_value(&wire);
            let mut b8 = [0u8; 8];
            b8[8 - be.len()..].copy_from_slice(&be);
            let u = u64::from_be_bytes(b8);
            let raw = match ty {
                DataType::U16 | DataType::U32 | DataType::U64 => Value::U64(u),
                DataType::I16 => Value::I64(i64::from(u as u16 as i16)),
                DataType::I32 => Value::I64(i64::from(u as u32 as i32)),
                DataType::I64 => Value::I64(u as i64),
                DataType::F32 => Value::F64(shortest_f32(f32::from_bits(u as u32))),
                _ => Value::F64(f64::from_bits(u)),
            };
            match raw {
                Value::F64(x) if !fmt.scaled() => Value::F64(match fmt.decimals {
                    Some(d) => round_to(x, usize::from(d)),
                    None => x,
                }),
                raw if fmt.scaled() => {
                    let x = raw.as_f64().unwrap_or(f64::NAN);
                    let implied =
                        (decimals_of(x) + decimals_of(fmt.scale)).max(decimals_of(fmt.offset));
                    let d = fmt.decimals.map(usize::from).unwrap_or(implied);
                    Value::F64(round_to(x * fmt.scale + fmt.offset, d))
                }
                raw => raw,
            }
        }
    };
    Ok(v)
}

/// The `f64` of the shortest decimal that reads back as `f` (`f` itself if not finite).
pub fn shortest_f32(f: f32) -> f64 {
    if !f.is_finite() {
        return f64::from(f);
    }
    // Display of an f32 is its shortest round-tripping decimal, never in exponent form.
    format!("{f}").parse().unwrap_or(f64::from(f))
}

/// Digits after the point of `x`'s shortest decimal (0 for integers and non-finite values).
fn decimals_of(x: f64) -> usize {
    if !x.is_finite() {
        return 0;
    }
    let s = format!("{x}");
    s.split_once('.').map_or(0, |(_, frac)| frac.len())
}

/// `x` rounded to `d` decimals: the `f64` nearest to that decimal, whose shortest form has
/// at most `d` decimals. Non-finite values pass through.
fn round_to(x: f64, d: usize) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.d$}").parse().unwrap_or(x)
}

/// Encodes a JSON write value for a tag of format `fmt`.
pub fn encode(fmt: &Format, v: &serde_json::Value) -> Result<Encoded, CodecError> {
    match fmt.ty {
        DataType::Bool if fmt.count > 1 => {
            let serde_json::Value::Array(items) = v else {
                return Err(CodecError::WrongType {
                    ty: fmt.ty,
                    want: "an array of true, false, 0 or 1 (one per coil)",
                    got: v.to_string(),
                });
            };
            if items.len() != usize::from(fmt.count) {
                return Err(CodecError::Count {
                    got: items.len(),
                    count: fmt.count,
                });
            }
            let mut one = fmt.clone();
            one.count = 1;
            items
                .iter()
                .map(|item| match encode(&one, item) {
                    Ok(Encoded::Coil(b)) => Ok(b),
                    Ok(_) | Err(_) => Err(CodecError::WrongType {
                        ty: fmt.ty,
                        want: "an array of true, false, 0 or 1 (one per coil)",
                        got: v.to_string(),
                    }),
                })
                .collect::<Result<Vec<bool>, CodecError>>()
                .map(Encoded::Coils)
        }
        DataType::Bool | DataType::Bit => {
            let b = match v {
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::Number(n) if n.as_u64() == Some(0) => false,
                serde_json::Value::Number(n) if n.as_u64() == Some(1) => true,
                other => {
                    return Err(CodecError::WrongType {
                        ty: fmt.ty,
                        want: "true, false, 0 or 1",
                        got: other.to_string(),
                    })
                }
            };
            Ok(if fmt.ty == DataType::Bool {
                Encoded::Coil(b)
            } else {
                Encoded::Bit {
                    bit: fmt.bit,
                    value: b,
                }
            })
        }
        DataType::String => {
            let serde_json::Value::String(s) = v else {
                return Err(CodecError::WrongType {
                    ty: fmt.ty,
                    want: "a string",
                    got: v.to_string(),
                });
            };
            if s.len() > usize::from(fmt.length) {
                return Err(CodecError::TooLong {
                    len: s.len(),
                    length: fmt.length,
                });
            }
            let mut bytes = s.as_bytes().to_vec();
            bytes.resize(usize::from(fmt.registers()) * 2, 0);
            if fmt.order.swaps_string_bytes() {
                for pair in bytes.chunks_mut(2) {
                    pair.swap(0, 1);
                }
            }
            Ok(Encoded::Registers(
                bytes
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect(),
            ))
        }
        ty => {
            let serde_json::Value::Number(n) = v else {
                return Err(CodecError::WrongType {
                    ty,
                    want: "a number",
                    got: v.to_string(),
                });
            };
            let be: Vec<u8> = if ty.is_integer() {
                let raw = integer_raw(fmt, n)?;
                let full = (raw as u128 as u64).to_be_bytes();
                full[8 - ty.width()..].to_vec()
            } else {
                let x = n.as_f64().unwrap_or(f64::NAN);
                let raw = (x - fmt.offset) / fmt.scale;
                if ty == DataType::F32 {
                    if !raw.is_finite() || raw.abs() > f64::from(f32::MAX) {
                        return Err(out_of_range(
                            fmt,
                            n,
                            -f64::from(f32::MAX),
                            f64::from(f32::MAX),
                        ));
                    }
                    (raw as f32).to_be_bytes().to_vec()
                } else {
                    if !raw.is_finite() {
                        return Err(out_of_range(fmt, n, f64::MIN, f64::MAX));
                    }
                    raw.to_be_bytes().to_vec()
                }
            };
            let wire = fmt.order.value_to_wire(&be);
            Ok(Encoded::Registers(
                wire.chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect(),
            ))
        }
    }
}

/// The raw integer for an engineering value, exactly when unscaled, else rounded to the
/// nearest step when it is (within rounding noise) a whole step.
fn integer_raw(fmt: &Format, n: &serde_json::Number) -> Result<i128, CodecError> {
    let (min, max) = fmt.ty.int_range();
    let raw: i128 = if !fmt.scaled() && (n.is_i64() || n.is_u64()) {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .unwrap_or(i128::MAX)
    } else {
        let x = n.as_f64().unwrap_or(f64::NAN);
        let r = (x - fmt.offset) / fmt.scale;
        if !r.is_finite() {
            return Err(int_out_of_range(fmt, n));
        }
        let rounded = r.round();
        if (r - rounded).abs() > 1e-6 * rounded.abs().max(1.0) {
            return Err(CodecError::NotRepresentable {
                value: n.to_string(),
                scale: fmt.scale,
                offset: fmt.offset,
            });
        }
        // Saturating cast, then the range check below catches anything outside the type.
        if rounded >= 1.8e19 {
            i128::MAX
        } else if rounded <= -1.8e19 {
            i128::MIN
        } else {
            rounded as i128
        }
    };
    if raw < min || raw > max {
        return Err(int_out_of_range(fmt, n));
    }
    Ok(raw)
}

fn int_out_of_range(fmt: &Format, n: &serde_json::Number) -> CodecError {
    let (min, max) = fmt.ty.int_range();
    if fmt.scaled() {
        let d = decimals_of(fmt.scale).max(decimals_of(fmt.offset));
        let (a, b) = (
            round_to(min as f64 * fmt.scale + fmt.offset, d),
            round_to(max as f64 * fmt.scale + fmt.offset, d),
        );
        out_of_range(fmt, n, a.min(b), a.max(b))
    } else {
        CodecError::OutOfRange {
            value: n.to_string(),
            ty: fmt.ty,
            min: min.to_string(),
            max: max.to_string(),
        }
    }
}

fn out_of_range(fmt: &Format, n: &serde_json::Number, raw_min: f64, raw_max: f64) -> CodecError {
    let (min, max) = if fmt.ty.is_integer() {
        (raw_min, raw_max)
    } else {
        let (a, b) = (
            raw_min * fmt.scale + fmt.offset,
            raw_max * fmt.scale + fmt.offset,
        );
        (a.min(b), a.max(b))
    };
    CodecError::OutOfRange {
        value: n.to_string(),
        ty: fmt.ty,
        min: format!("{min}"),
        max: format!("{max}"),
    }
}

/// Whether `ty` is signed (for the probe's column headings).
pub fn is_signed(ty: DataType) -> bool {
    ty.is_signed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn regs(fmt: &Format, v: serde_json::Value) -> Vec<u16> {
        match encode(fmt, &v).expect("encode") {
            Encoded::Registers(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn known_32_bit_layouts() {
        // 0x11223344 = 287454020
        let v = json!(0x1122_3344u32);
        let t = |o| regs(&Format::new(DataType::U32, o), v.clone());
        assert_eq!(t(Order::Abcd), [0x1122, 0x3344]);
        assert_eq!(t(Order::Dcba), [0x4433, 0x2211]);
        assert_eq!(t(Order::Badc), [0x2211, 0x4433]);
        assert_eq!(t(Order::Cdab), [0x3344, 0x1122]);
    }

    #[test]
    fn known_64_bit_layouts() {
        let v = json!(0x1122_3344_5566_7788u64);
        let t = |o| regs(&Format::new(DataType::U64, o), v.clone());
        assert_eq!(t(Order::Abcd), [0x1122, 0x3344, 0x5566, 0x7788]);
        assert_eq!(t(Order::Dcba), [0x8877, 0x6655, 0x4433, 0x2211]);
        assert_eq!(t(Order::Badc), [0x2211, 0x4433, 0x6655, 0x8877]);
        assert_eq!(t(Order::Cdab), [0x7788, 0x5566, 0x3344, 0x1122]);
    }

    #[test]
    fn known_16_bit_and_float() {
        assert_eq!(
            regs(&Format::new(DataType::U16, Order::Abcd), json!(0x1234)),
            [0x1234]
        );
        assert_eq!(
            regs(&Format::new(DataType::U16, Order::Dcba), json!(0x1234)),
            [0x3412]
        );
        assert_eq!(
            regs(&Format::new(DataType::I16, Order::Abcd), json!(-2)),
            [0xfffe]
        );
        // 1.5f32 = 0x3fc00000
        assert_eq!(
            regs(&Format::new(DataType::F32, Order::Abcd), json!(1.5)),
            [0x3fc0, 0]
        );
        assert_eq!(
            regs(&Format::new(DataType::F32, Order::Cdab), json!(1.5)),
            [0, 0x3fc0]
        );
        let f = Format::new(DataType::F32, Order::Abcd);
        assert_eq!(decode(&f, &[0x41c8, 0]), Ok(Value::F64(25.0)));
        assert_eq!(
            decode(&Format::new(DataType::I32, Order::Cdab), &[0xfffe, 0xffff]),
            Ok(Value::I64(-2))
        );
    }

    #[test]
    fn order_spellings() {
        for (s, o) in [
            ("ABCD", Order::Abcd),
            ("ABCDEFGH", Order::Abcd),
            ("AB", Order::Abcd),
            ("hgfedcba", Order::Dcba),
            ("BA", Order::Dcba),
            ("BADCFEHG", Order::Badc),
            ("GHEFCDAB", Order::Cdab),
        ] {
            assert_eq!(Order::try_from(s.to_string()), Ok(o), "{s}");
        }
        assert!(Order::try_from("ACBD".to_string()).is_err());
        for o in Order::ALL {
            for w in [2, 4, 8] {
                assert_eq!(
                    Order::try_from(o.spelling(w).to_string()).map(|x| x.spelling(w)),
                    Ok(o.spelling(w))
                );
            }
        }
    }

    #[test]
    fn scale_and_offset() {
        let mut f = Format::new(DataType::I16, Order::Abcd);
        f.scale = 0.1;
        f.offset = -40.0;
        // raw 615 -> 21.5
        let v = decode(&f, &[615]).expect("decode");
        let Value::F64(x) = v else { panic!("{v:?}") };
        assert!((x - 21.5).abs() < 1e-9, "{x}");
        assert_eq!(regs(&f, json!(21.5)), [615]);
        assert!(matches!(
            encode(&f, &json!(21.55)),
            Err(CodecError::NotRepresentable { .. })
        ));
        // i16 max 32767 -> 3236.7
        let e = encode(&f, &json!(4000)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "out of range: 4000 is outside i16 [-3316.8, 3236.7]"
        );
    }

    #[test]
    fn floats_and_scaled_values_carry_no_binary_noise() {
        let f = Format::new(DataType::F32, Order::Abcd);
        let regs = |x: f32| {
            let b = x.to_bits();
            [(b >> 16) as u16, b as u16]
        };
        let txt = |v: Value| v.to_json().to_string();
        assert_eq!(
            txt(decode(&f, &regs(std::f32::consts::PI)).unwrap()),
            "3.1415927"
        );
        assert_eq!(txt(decode(&f, &regs(0.1)).unwrap()), "0.1");
        assert_eq!(txt(decode(&f, &regs(-1234.5678)).unwrap()), "-1234.5677");
        assert_eq!(txt(decode(&f, &regs(1e-30)).unwrap()), "1e-30");
        assert!(matches!(decode(&f, &regs(f32::NAN)), Ok(Value::F64(x)) if x.is_nan()));
        let mut s = Format::new(DataType::U16, Order::Abcd);
        s.scale = 0.1;
        assert_eq!(txt(decode(&s, &[3]).unwrap()), "0.3");
        s.offset = 273.15;
        assert_eq!(txt(decode(&s, &[3]).unwrap()), "273.45");
        s.offset = 0.0;
        s.scale = 0.01;
        assert_eq!(txt(decode(&s, &[2155]).unwrap()), "21.55");
        // A scaled float keeps its own decimals plus the scale's.
        let mut sf = Format::new(DataType::F32, Order::Abcd);
        sf.scale = 0.1;
        assert_eq!(txt(decode(&sf, &regs(215.3)).unwrap()), "21.53");
        // `decimals` overrides, scaled or not; integers unscaled stay exact.
        sf.decimals = Some(0);
        assert_eq!(txt(decode(&sf, &regs(215.3)).unwrap()), "22.0");
        let mut r = Format::new(DataType::F32, Order::Abcd);
        r.decimals = Some(2);
        assert_eq!(
            txt(decode(&r, &regs(std::f32::consts::PI)).unwrap()),
            "3.14"
        );
        let mut i = Format::new(DataType::U16, Order::Abcd);
        i.decimals = Some(2);
        assert_eq!(decode(&i, &[7]), Ok(Value::U64(7)));
    }

    #[test]
    fn range_checks_are_precise() {
        let f = Format::new(DataType::U16, Order::Abcd);
        assert_eq!(
            encode(&f, &json!(70000)).unwrap_err().to_string(),
            "out of range: 70000 is outside u16 [0, 65535]"
        );
        assert!(encode(&f, &json!(-1)).is_err());
        assert!(encode(&f, &json!(1.5)).is_err());
        assert!(matches!(
            encode(&f, &json!("7")),
            Err(CodecError::WrongType { .. })
        ));
        let f = Format::new(DataType::I64, Order::Abcd);
        assert!(encode(&f, &json!(u64::MAX)).is_err());
        assert_eq!(regs(&f, json!(i64::MIN)), [0x8000, 0, 0, 0]);
        let f = Format::new(DataType::U64, Order::Abcd);
        assert_eq!(regs(&f, json!(u64::MAX)), [0xffff; 4]);
        let f = Format::new(DataType::F32, Order::Abcd);
        assert!(matches!(
            encode(&f, &json!(1e300)),
            Err(CodecError::OutOfRange { .. })
        ));
    }

    #[test]
    fn bools_bits_and_strings() {
        let mut f = Format::new(DataType::Bit, Order::Abcd);
        f.bit = 3;
        assert_eq!(decode(&f, &[0b1000]), Ok(Value::Bool(true)));
        assert_eq!(decode(&f, &[0b0111]), Ok(Value::Bool(false)));
        assert_eq!(
            encode(&f, &json!(true)),
            Ok(Encoded::Bit {
                bit: 3,
                value: true
            })
        );
        let b = Format::new(DataType::Bool, Order::Abcd);
        assert_eq!(encode(&b, &json!(0)), Ok(Encoded::Coil(false)));
        assert!(encode(&b, &json!(2)).is_err());
        assert_eq!(decode_bool(&[true, false]), Ok(Value::Bool(true)));
        let mut c = Format::new(DataType::Bool, Order::Abcd);
        c.count = 3;
        assert_eq!(c.registers(), 3);
        assert_eq!(
            decode_bits(&c, &[true, false, true, true]),
            Ok(Value::Bools(vec![true, false, true]))
        );
        assert_eq!(
            Value::Bools(vec![true, false]).to_json(),
            json!([true, false])
        );
        assert!(matches!(
            decode_bits(&c, &[true]),
            Err(CodecError::Short { .. })
        ));
        assert_eq!(
            encode(&c, &json!([true, 0, 1])),
            Ok(Encoded::Coils(vec![true, false, true]))
        );
        assert_eq!(
            encode(&c, &json!([true])).unwrap_err().to_string(),
            "wrong number of values: 1 for a tag of count 3; send an array of 3 booleans"
        );
        assert!(matches!(
            encode(&c, &json!(true)),
            Err(CodecError::WrongType { .. })
        ));
        assert!(matches!(
            encode(&c, &json!([true, 2, 0])),
            Err(CodecError::WrongType { .. })
        ));

        let mut s = Format::new(DataType::String, Order::Abcd);
        s.length = 5;
        assert_eq!(s.registers(), 3);
        assert_eq!(regs(&s, json!("AB1")), [0x4142, 0x3100, 0]);
        assert_eq!(
            decode(&s, &[0x4142, 0x3100, 0]),
            Ok(Value::Str("AB1".into()))
        );
        s.order = Order::Badc;
        assert_eq!(regs(&s, json!("AB1")), [0x4241, 0x0031, 0]);
        assert_eq!(
            decode(&s, &[0x4241, 0x0031, 0]),
            Ok(Value::Str("AB1".into()))
        );
        assert!(matches!(
            encode(&s, &json!("too long")),
            Err(CodecError::TooLong { len: 8, length: 5 })
        ));
    }

    #[test]
    fn short_input_is_an_error_not_a_panic() {
        let f = Format::new(DataType::F64, Order::Abcd);
        assert_eq!(
            decode(&f, &[1, 2]),
            Err(CodecError::Short {
                ty: DataType::F64,
                need: 4,
                got: 2
            })
        );
        assert!(decode_bool(&[]).is_err());
    }

    /// A value that every type can represent exactly, drawn from the type's raw range.
    fn raw_value(ty: DataType) -> BoxedStrategy<serde_json::Value> {
        match ty {
            DataType::Bool | DataType::Bit => any::<bool>().prop_map(|b| json!(b)).boxed(),
            DataType::U16 => any::<u16>().prop_map(|v| json!(v)).boxed(),
            DataType::I16 => any::<i16>().prop_map(|v| json!(v)).boxed(),
            DataType::U32 => any::<u32>().prop_map(|v| json!(v)).boxed(),
            DataType::I32 => any::<i32>().prop_map(|v| json!(v)).boxed(),
            DataType::U64 => any::<u64>().prop_map(|v| json!(v)).boxed(),
            DataType::I64 => any::<i64>().prop_map(|v| json!(v)).boxed(),
            DataType::F32 => any::<f32>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|v| json!(shortest_f32(v)))
                .boxed(),
            DataType::F64 => any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|v| json!(v))
                .boxed(),
            DataType::String => "[ -~]{0,9}".prop_map(|s| json!(s)).boxed(),
        }
    }

    fn any_case() -> impl Strategy<Value = (Format, serde_json::Value)> {
        (
            prop::sample::select(DataType::ALL.to_vec()),
            prop::sample::select(Order::ALL.to_vec()),
            0u8..16,
        )
            .prop_flat_map(|(ty, order, bit)| {
                let mut f = Format::new(ty, order);
                f.bit = bit;
                f.length = 9;
                (Just(f), raw_value(ty))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Unscaled: every type x order round-trips exactly through the registers.
        #[test]
        fn roundtrip_unscaled((fmt, v) in any_case()) {
            let enc = encode(&fmt, &v).expect("representable value encodes");
            let back = match enc {
                Encoded::Coil(b) => decode_bool(&[b]).expect("decode"),
                Encoded::Coils(b) => decode_bits(&fmt, &b).expect("decode"),
                Encoded::Bit { bit, value } => {
                    let reg = if value { 1u16 << bit } else { 0 };
                    decode(&fmt, &[reg]).expect("decode")
                }
                Encoded::Registers(r) => {
                    prop_assert_eq!(r.len(), usize::from(fmt.registers()));
                    decode(&fmt, &r).expect("decode")
                }
            };
            prop_assert_eq!(back.to_json(), v);
        }

        /// Scaled: raw -> engineering value -> registers gives the same registers, for every
        /// numeric type x order x scale.
        #[test]
        fn roundtrip_scaled(
            ty in prop::sample::select(vec![
                DataType::U16, DataType::I16, DataType::U32, DataType::I32,
                DataType::U64, DataType::I64, DataType::F32, DataType::F64,
            ]),
            order in prop::sample::select(Order::ALL.to_vec()),
            scale in prop::sample::select(vec![0.001, 0.01, 0.1, 0.5, 2.0, 10.0, -1.0, 1.0]),
            offset in prop::sample::select(vec![0.0, -40.0, 273.15, 1.0]),
            seed in any::<u64>(),
        ) {
            let mut fmt = Format::new(ty, order);
            fmt.scale = scale;
            fmt.offset = offset;
            // Raw values small enough that raw x scale + offset is exact to 1e-6 in f64.
            let raw_regs: Vec<u16> = {
                let r = (seed % 2_000_000) as i64 - if ty.is_signed() { 1_000_000 } else { 0 };
                let r = if ty.is_signed() { r } else { r.abs() };
                let r = if ty.width() == 2 { r.clamp(ty.int_range().0 as i64, ty.int_range().1 as i64) } else { r };
                let json_raw = if matches!(ty, DataType::F32 | DataType::F64) {
                    json!(r as f64 / 4.0)
                } else {
                    json!(r)
                };
                match encode(&Format::new(ty, order), &json_raw).expect("raw encodes") {
                    Encoded::Registers(x) => x,
                    other => panic!("{other:?}"),
                }
            };
            let value = decode(&fmt, &raw_regs).expect("decode");
            // Scaled values are floats; scale 1 with offset 0 keeps integers exact.
            let again = encode(&fmt, &value.to_json());
            if ty == DataType::F32 {
                // f32 holds the raw exactly; (x - offset) / scale may land one ulp off.
                let Ok(Encoded::Registers(r)) = again else { panic!("{again:?}") };
                let a = decode(&Format::new(ty, order), &r).expect("decode").as_f64().unwrap_or(f64::NAN);
                let b = decode(&Format::new(ty, order), &raw_regs).expect("decode").as_f64().unwrap_or(f64::NAN);
                prop_assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
            } else if ty == DataType::F64 {
                let Ok(Encoded::Registers(r)) = again else { panic!("{again:?}") };
                let a = decode(&Format::new(ty, order), &r).expect("decode").as_f64().unwrap_or(f64::NAN);
                let b = decode(&Format::new(ty, order), &raw_regs).expect("decode").as_f64().unwrap_or(f64::NAN);
                prop_assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} vs {b}");
            } else {
                prop_assert_eq!(again, Ok(Encoded::Registers(raw_regs)));
            }
        }
    }
}
