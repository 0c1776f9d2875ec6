//! One framed reader/writer for both sockets of a session: the device's ([`DeviceCodec`]:
//! MQTT 5 packets, read and written as MQTT 3.1.1 for a 3.1.1 device, see [`super::v311`])
//! and the loopback one to rumqttd (MQTT 5 packets, [`BrokerCodec`]).
//!
//! Owns a socket's two halves, the bytes read and not yet parsed, and the bytes encoded and
//! not yet written. What a packet means is the relay's business ([`super::relay`]); this
//! module only frames.
//!
//! Invariants:
//! - [`Framed::parse`] never reads: it takes a complete packet already buffered, or says
//!   that more bytes are needed. [`Framed::next`] reads until it has one and is cancel-safe
//!   (bytes read so far stay in the buffer), so it can sit in a `select!`;
//! - writes are batched: [`Framed::queue`] only encodes, and [`Framed::flush`] writes
//!   everything queued in one call. The relay flushes before it reads again, so a device that
//!   stops reading still stops its own session (TCP back-pressure), and the write buffer
//!   holds at most what one batch of input produced;
//! - every failure maps to the [`End`] of its side: a device that sends a packet over
//!   `max_payload_size` is [`End::TooLarge`], a malformed one [`End::ProtocolViolation`], a
//!   closed or failed device socket [`End::DeviceGone`]; anything wrong on rumqttd's side is
//!   [`End::BrokerGone`].

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet as P4;
use rumqttc::v5::mqttbytes::v5::{self, Packet as P5};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::session::End;
use super::v311;

/// Most the read buffer grows by ahead of one read (a large packet is read in steps).
pub const READ_RESERVE: usize = 64 * 1024;

/// What [`Codec::decode`] found at the front of the read buffer.
#[derive(Debug)]
pub enum Decoded<P> {
    /// A whole packet, taken off the buffer.
    Packet(P),
    /// Not a whole packet yet: at least this many more bytes are needed.
    Short(usize),
}

/// The packets of one side.
pub trait Codec {
    /// The packet type.
    type Packet;
    /// Takes a whole packet off the front of `buf`, if one is there. Err: how the session ends.
    fn decode(&self, buf: &mut BytesMut) -> Result<Decoded<Self::Packet>, End>;
    /// Appends `p` to `out`. Err: how the session ends.
    fn encode(&self, p: Self::Packet, out: &mut BytesMut) -> Result<(), End>;
    /// How the session ends when the socket closes or fails.
    fn gone(&self) -> End;
}

/// The device's side: packets of at most `max` bytes of remaining length, as MQTT 5 packets
/// whatever the device's protocol level.
#[derive(Debug, Clone, Copy)]
pub struct DeviceCodec {
    /// `broker.max_payload_size`.
    pub max: usize,
    /// The device spoke MQTT 5 in its CONNECT; until then, and for 3.1 and 3.1.1, false.
    pub v5: bool,
    /// MQTT 5: the device's maximum packet size (the relay sends nothing larger).
    pub out_max: Option<u32>,
}

impl DeviceCodec {
    /// Before the CONNECT: 3.1.1 framing (the CONNECT itself is read by `session`).
    pub fn new(max: usize) -> DeviceCodec {
        DeviceCodec {
            max,
            v5: false,
            out_max: None,
        }
    }
}

impl Codec for DeviceCodec {
    type Packet = P5;

    fn decode(&self, buf: &mut BytesMut) -> Result<Decoded<P5>, End> {
        if self.v5 {
            // rumqttc 0.25 refuses a DISCONNECT without a reason code (remaining length 0,
            // normal disconnection: MQTT-3.14.2.1), the form most clients send.
            if buf.starts_with(&[0xE0, 0x00]) {
                let _ = buf.split_to(2);
                return Ok(Decoded::Packet(P5::Disconnect(v5::Disconnect::new(
                    v5::DisconnectReasonCode::NormalDisconnection,
                ))));
            }
            let max = u32::try_from(self.max).unwrap_or(u32::MAX);
            return match P5::read(buf, Some(max)) {
                Ok(p) => Ok(Decoded::Packet(p)),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(n)) => Ok(Decoded::Short(n)),
                Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { .. }) => {
                    Err(End::TooLarge)
                }
                Err(_) => Err(End::ProtocolViolation),
            };
        }
        match P4::read(buf, self.max) {
            Ok(p) => Ok(Decoded::Packet(v311::to_v5(p))),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => Ok(Decoded::Short(n)),
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)) => Err(End::TooLarge),
            Err(_) => Err(End::ProtocolViolation),
        }
    }

    fn encode(&self, p: P5, out: &mut BytesMut) -> Result<(), End> {
        if self.v5 {
            return p
                .write(out, self.out_max)
                .map(|_| ())
                .map_err(|_| End::ProtocolViolation);
        }
        match v311::to_v4(p) {
            Some(p) => p
                .write(out, usize::MAX)
                .map(|_| ())
                .map_err(|_| End::ProtocolViolation),
            None => Ok(()),
        }
    }

    fn gone(&self) -> End {
        End::DeviceGone
    }
}

/// rumqttd's side: MQTT 5 packets, no size limit (rumqttd enforces its own).
#[derive(Debug, Clone, Copy)]
pub struct BrokerCodec;

impl Codec for BrokerCodec {
    type Packet = P5;

    fn decode(&self, buf: &mut BytesMut) -> Result<Decoded<P5>, End> {
        match P5::read(buf, None) {
            Ok(p) => Ok(Decoded::Packet(p)),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(n)) => Ok(Decoded::Short(n)),
            Err(_) => Err(End::BrokerGone),
        }
    }

    fn encode(&self, p: P5, out: &mut BytesMut) -> Result<(), End> {
        p.write(out, None).map(|_| ()).map_err(|_| End::BrokerGone)
    }

    fn gone(&self) -> End {
        End::BrokerGone
    }
}

/// A socket's halves with their read and write buffers.
pub struct Framed<R, W, C> {
    rd: R,
    wr: W,
    buf: BytesMut,
    out: BytesMut,
    codec: C,
}

impl<R, W, C> Framed<R, W, C>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: Codec,
{
    /// Frames `rd` and `wr` with `codec`.
    pub fn new(rd: R, wr: W, codec: C) -> Framed<R, W, C> {
        Framed {
            rd,
            wr,
            buf: BytesMut::with_capacity(4096),
            out: BytesMut::with_capacity(4096),
            codec,
        }
    }

    /// A complete packet already buffered, without reading.
    pub fn parse(&mut self) -> Result<Option<C::Packet>, End> {
        match self.codec.decode(&mut self.buf)? {
            Decoded::Packet(p) => Ok(Some(p)),
            Decoded::Short(n) => {
                self.buf.reserve(n.min(READ_RESERVE));
                Ok(None)
            }
        }
    }

    /// The next packet; cancel-safe (bytes read so far stay buffered).
    pub async fn next(&mut self) -> Result<C::Packet, End> {
        loop {
            if let Some(p) = self.parse()? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    /// One read into the buffer; Err when the socket closed or failed. Cancel-safe.
    pub async fn read_more(&mut self) -> Result<(), End> {
        match self.rd.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => Err(self.codec.gone()),
            Ok(_) => Ok(()),
        }
    }

    /// The bytes read and not parsed yet (the device's CONNECT is looked at here before it
    /// is parsed, see `session`).
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Encodes a packet for the next [`Framed::flush`].
    pub fn queue(&mut self, p: C::Packet) -> Result<(), End> {
        self.codec.encode(p, &mut self.out)
    }

    /// Writes everything queued, in one write.
    pub async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.wr.write_all(&self.out).await;
        self.out.clear();
        r.map_err(|_| self.codec.gone())?;
        // A TLS stream holds written bytes until it is flushed; a TCP stream's flush is a
        // no-op.
        self.wr.flush().await.map_err(|_| self.codec.gone())
    }

    /// Queues `p` and flushes.
    pub async fn send(&mut self, p: C::Packet) -> Result<(), End> {
        self.queue(p)?;
        self.flush().await
    }

    /// The codec (the device's protocol level is set once its CONNECT is read).
    pub fn codec_mut(&mut self) -> &mut C {
        &mut self.codec
    }

    /// The socket's halves themselves (closing the upstream socket reads and shuts down
    /// past the framing).
    pub fn halves(&mut self) -> (&mut R, &mut W) {
        (&mut self.rd, &mut self.wr)
    }
}
