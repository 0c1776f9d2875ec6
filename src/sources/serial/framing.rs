//! Cutting a serial byte stream into frames.
//!
//! Owns the bytes read from a port that do not yet form a whole frame. Pure code, no I/O:
//! the port task [`Framer::push`]es whatever a read returned and then takes frames with
//! [`Framer::next_frame`] until it says `None`.
//!
//! Invariants:
//! - delimiter mode: a frame is the bytes before the delimiter (delimiter excluded; with the
//!   single-byte delimiter `\n`, a `\r` right before it is removed too). A delimiter split
//!   across two reads is still found. Empty frames (blank lines) are skipped.
//! - a frame longer than `max_length` is reported once as [`Frame::TooLong`] and its bytes are
//!   thrown away up to and including the next delimiter; the frame after it is intact. So the
//!   buffer never holds more than `max_length` + delimiter + one read, whatever the line sends.
//! - fixed mode: every `length` bytes is a frame. There is no resynchronisation inside a
//!   stream (nothing marks a frame's start); [`Framer::reset`] after a reconnect starts afresh.

use bytes::{Buf, Bytes, BytesMut};

use super::config::{unescape, FramingConfig, FramingMode};

/// What the framer hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One complete frame, delimiter removed.
    Data(Bytes),
    /// A frame longer than `max_length` was dropped (reported once per frame).
    TooLong,
}

#[derive(Debug)]
enum Kind {
    Delimiter {
        delim: Vec<u8>,
        max: usize,
        strip_cr: bool,
    },
    Fixed(usize),
}

/// Splits a byte stream into frames; see the module header.
#[derive(Debug)]
pub struct Framer {
    kind: Kind,
    buf: BytesMut,
    /// Bytes at the front of `buf` already searched for the delimiter without success.
    scanned: usize,
    /// Inside an over-long frame: drop bytes until the next delimiter.
    discarding: bool,
}

impl Framer {
    /// A framer for a validated config. `Err` (a bad delimiter escape) cannot happen after
    /// [`super::config::validate`]; the caller reports it as a configuration error.
    pub fn new(cfg: &FramingConfig) -> Result<Framer, String> {
        let kind = match cfg.mode {
            FramingMode::Delimiter => {
                let delim = unescape(&cfg.delimiter)?;
                if delim.is_empty() {
                    return Err("empty delimiter".into());
                }
                Kind::Delimiter {
                    strip_cr: delim == b"\n",
                    delim,
                    max: cfg.max_length.max(1),
                }
            }
            FramingMode::Fixed => Kind::Fixed(cfg.length.max(1)),
        };
        Ok(Framer {
            kind,
            buf: BytesMut::with_capacity(4096),
            scanned: 0,
            discarding: false,
        })
    }

    /// Appends bytes read from the port.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Forgets a partial frame (after the port was lost and reopened). Returns how many
    /// bytes were thrown away.
    pub fn reset(&mut self) -> usize {
        let n = self.buf.len();
        self.buf.clear();
        self.scanned = 0;
        self.discarding = false;
        n
    }

    /// The next complete frame or drop report, or `None` until more bytes are pushed.
    pub fn next_frame(&mut self) -> Option<Frame> {
        match &self.kind {
            Kind::Fixed(n) => {
                let n = *n;
                (self.buf.len() >= n).then(|| Frame::Data(self.buf.split_to(n).freeze()))
            }
            Kind::Delimiter {
                delim,
                max,
                strip_cr,
            } => {
                let (dlen, max, strip_cr) = (delim.len(), *max, *strip_cr);
                loop {
                    // A delimiter may straddle the already scanned part and the new bytes.
                    let from = self.scanned.saturating_sub(dlen - 1);
                    let found = find(&self.buf[from..], delim).map(|p| p + from);
                    let Some(pos) = found else {
                        self.scanned = self.buf.len();
                        // Longest legitimate partial frame: max bytes, the '\r' that will be
                        // stripped, and all but the last byte of the delimiter.
                        let limit = max + usize::from(strip_cr) + dlen - 1;
                        if self.buf.len() <= limit {
                            return None;
                        }
                        // Keep only what could be the start of a delimiter.
                        let keep = dlen - 1;
                        self.buf.advance(self.buf.len() - keep);
                        self.scanned = self.buf.len();
                        let first = !self.discarding;
                        self.discarding = true;
                        return first.then_some(Frame::TooLong);
                    };
                    let mut frame = self.buf.split_to(pos);
                    self.buf.advance(dlen);
                    self.scanned = 0;
                    if std::mem::take(&mut self.discarding) {
                        // The tail of an over-long frame, already reported.
                        continue;
                    }
                    if strip_cr && frame.last() == Some(&b'\r') {
                        frame.truncate(frame.len() - 1);
                    }
                    if frame.len() > max {
                        return Some(Frame::TooLong);
                    }
                    if frame.is_empty() {
                        continue;
                    }
                    return Some(Frame::Data(frame.freeze()));
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if let [b] = needle {
        return hay.iter().position(|x| x == b);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delim(d: &str, max: usize) -> Framer {
        Framer::new(&FramingConfig {
            mode: FramingMode::Delimiter,
            delimiter: d.into(),
            max_length: max,
            length: 0,
        })
        .unwrap()
    }

    fn drain(f: &mut Framer) -> Vec<Frame> {
        std::iter::from_fn(|| f.next_frame()).collect()
    }

    fn data(s: &str) -> Frame {
        Frame::Data(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn newline_frames_strip_cr_and_skip_blank_lines() {
        let mut f = delim("\n", 100);
        f.push(b"a=1\r\nb=2\n\n\r\nc");
        assert_eq!(drain(&mut f), vec![data("a=1"), data("b=2")]);
        f.push(b"=3\n");
        assert_eq!(drain(&mut f), vec![data("c=3")]);
    }

    #[test]
    fn multi_byte_delimiter_split_across_reads() {
        let mut f = delim(r"\r\n", 100);
        for chunk in [&b"one\r"[..], b"\ntw", b"o\r", b"\n", b"x\ry\r\n"] {
            f.push(chunk);
        }
        assert_eq!(drain(&mut f), vec![data("one"), data("two"), data("x\ry")]);
        // Byte by byte gives the same frames.
        let mut g = delim(r"\r\n", 100);
        let mut out = Vec::new();
        for b in b"one\r\ntwo\r\n" {
            g.push(&[*b]);
            out.extend(drain(&mut g));
        }
        assert_eq!(out, vec![data("one"), data("two")]);
    }

    #[test]
    fn binary_delimiter() {
        let mut f = delim(r"\x03", 100);
        f.push(b"\x02AB\x03\x02C");
        assert_eq!(drain(&mut f), vec![data("\x02AB")]);
        f.push(b"\x03");
        assert_eq!(drain(&mut f), vec![data("\x02C")]);
    }

    #[test]
    fn over_long_frame_is_reported_once_and_the_stream_resyncs() {
        let mut f = delim("\n", 8);
        // Exactly max is fine; one more byte is too long.
        f.push(b"12345678\n123456789\nok\n");
        assert_eq!(
            drain(&mut f),
            vec![data("12345678"), Frame::TooLong, data("ok")]
        );
        // A long line arriving in many reads: one report, buffer stays bounded.
        let mut out = Vec::new();
        for _ in 0..100 {
            f.push(b"xxxxxxxxxxxxxxxx");
            out.extend(drain(&mut f));
            assert!(f.buf.len() <= 9, "buffer grew to {}", f.buf.len());
        }
        f.push(b"yyy\nnext\n");
        out.extend(drain(&mut f));
        assert_eq!(out, vec![Frame::TooLong, data("next")]);
    }

    #[test]
    fn over_long_frame_with_multi_byte_delimiter_split_at_the_boundary() {
        let mut f = delim(r"\r\n", 4);
        f.push(b"abcdefgh\r");
        assert_eq!(drain(&mut f), vec![Frame::TooLong]);
        f.push(b"\nabcd\r\n");
        assert_eq!(drain(&mut f), vec![data("abcd")]);
    }

    #[test]
    fn fixed_length_frames() {
        let mut f = Framer::new(&FramingConfig {
            mode: FramingMode::Fixed,
            length: 4,
            ..Default::default()
        })
        .unwrap();
        f.push(b"\x00\x01\x02");
        assert_eq!(drain(&mut f), vec![]);
        f.push(b"\x03\x04\x05\x06\x07\x08");
        assert_eq!(
            drain(&mut f),
            vec![
                Frame::Data(Bytes::from_static(b"\x00\x01\x02\x03")),
                Frame::Data(Bytes::from_static(b"\x04\x05\x06\x07")),
            ]
        );
        assert_eq!(f.reset(), 1);
        f.push(b"abcd");
        assert_eq!(drain(&mut f), vec![data("abcd")]);
    }
}
