//! The write-ahead file `<queue dir>/fieldgate.wal`: what makes a group commit durable with
//! one `pwrite` and one `fdatasync`, so that sled is flushed only at checkpoints.
//!
//! sled 0.34 makes a flush durable through its own thread pool (it wakes every idle pool
//! thread per flush) and `sync_file_range`, and the log file then needs an `fsync` of its
//! own: at 1,000 msg/s, where each message is about one commit, that was most of the
//! gateway's CPU. Instead, every commit writes what it inserted into sled (batch values,
//! retained-message changes) as one frame here, and sled's files are flushed and fsynced
//! about once a second (a checkpoint), after which the file is written from the start again.
//!
//! # Frame format
//! ```text
//! magic "FGW1" 4 bytes | crc u32 BE (CRC-32 of lsn, len and body) | lsn u64 BE | len u32 BE
//! body: ops, each [kind u8] then
//!   1 (batch):    [len u32 BE][a batch value, see `batch`]
//!   2 (retained): [qos u8][topic_len u16 BE][topic][payload_len u32 BE][payload]
//!   3 (cursor):   [cursor u64 BE] (the acknowledged-up-to cursor at this commit)
//! ```
//!
//! # Invariants
//! - The file is preallocated with zeros ([`PREALLOC`]) and rewritten in place from offset 0
//!   after each checkpoint, so a commit changes no file metadata: `fdatasync` is a data write
//!   and a device flush, not a file-system journal commit.
//! - Every write attempt takes a fresh `lsn` (a failed one too), and a checkpoint records
//!   the last one taken in sled's `meta` tree: at recovery exactly the frames with a larger
//!   `lsn` are replayed, whatever older frames are left later in the file.
//! - A frame whose checksum fails (a torn write at a crash, or damage) is skipped; it was
//!   never acknowledged if it was the last one written. Parsing never panics on any bytes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// File name inside the queue directory.
pub const FILE: &str = "fieldgate.wal";
/// Bytes written as zeros when the file is created (commits between two checkpoints fit in
/// it; a commit that does not fit makes a checkpoint instead).
pub const PREALLOC: u64 = 2 * 1024 * 1024;
const MAGIC: &[u8; 4] = b"FGW1";
const HEADER: usize = 4 + 4 + 8 + 4;
const OP_BATCH: u8 = 1;
const OP_RETAIN: u8 = 2;
const OP_CURSOR: u8 = 3;

/// One change recovered from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A batch value to insert under its first sequence number.
    Batch(Vec<u8>),
    /// A retained message to keep (empty payload: delete it).
    Retain {
        /// Local topic.
        topic: String,
        /// QoS it was published with.
        qos: u8,
        /// Payload.
        payload: Vec<u8>,
    },
    /// Every record below this was acknowledged by the cloud (or dropped).
    Cursor(u64),
}

/// An intact frame: its lsn and its ops.
pub type Frame = (u64, Vec<Op>);

/// The open file and the frame being built for the next commit.
pub struct Wal {
    file: File,
    /// Where the next frame goes.
    pos: u64,
    /// The lsn the next write attempt takes.
    next_lsn: u64,
    /// Ops staged since the last write.
    body: Vec<u8>,
}

impl Wal {
    /// Opens (or creates and preallocates) the file in `dir` and reads every intact frame:
    /// `(lsn, ops)` in file order. The next frame takes an lsn above `floor` (the last
    /// checkpoint's) and above every frame found, and goes after the newest frame if that
    /// one is above `floor` (not yet checkpointed), else at offset 0.
    pub fn open(dir: &Path, floor: u64) -> std::io::Result<(Wal, Vec<Frame>)> {
        let path = dir.join(FILE);
        let found = match std::fs::read(&path) {
            Ok(bytes) => parse_at(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create(&path)?;
                sync_dir(dir)?;
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let newest = found.iter().max_by_key(|(l, _, _)| *l);
        let pos = newest
            .filter(|(l, _, _)| *l > floor)
            .map_or(0, |(_, _, end)| *end);
        let top = newest.map_or(0, |(l, _, _)| *l).max(floor);
        let frames = found.into_iter().map(|(l, ops, _)| (l, ops)).collect();
        Ok((
            Wal {
                file,
                pos: pos as u64,
                next_lsn: top + 1,
                body: Vec::new(),
            },
            frames,
        ))
    }

    /// Stages a batch value for the next [`Wal::write`].
    pub fn stage_batch(&mut self, value: &[u8]) {
        self.body.push(OP_BATCH);
        self.body
            .extend_from_slice(&(value.len() as u32).to_be_bytes());
        self.body.extend_from_slice(value);
    }

    /// Stages a retained-message change for the next [`Wal::write`].
    pub fn stage_retain(&mut self, topic: &str, qos: u8, payload: &[u8]) {
        let topic = &topic.as_bytes()[..topic.len().min(u16::MAX as usize)];
        self.body.push(OP_RETAIN);
        self.body.push(qos);
        self.body
            .extend_from_slice(&(topic.len() as u16).to_be_bytes());
        self.body.extend_from_slice(topic);
        self.body
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.body.extend_from_slice(payload);
    }

    /// Stages the acknowledged-up-to cursor for the next [`Wal::write`], so what the cloud
    /// took is not sent again after a crash (only with other ops: on its own it is not worth
    /// an `fdatasync`; the next checkpoint saves it).
    pub fn stage_cursor(&mut self, cursor: u64) {
        self.body.push(OP_CURSOR);
        self.body.extend_from_slice(&cursor.to_be_bytes());
    }

    /// Whether anything is staged.
    pub fn staged(&self) -> bool {
        !self.body.is_empty()
    }

    /// Drops what is staged (a failed commit: the journal stages it again).
    pub fn clear(&mut self) {
        self.body.clear();
    }

    /// Whether the staged frame fits before the end of the preallocated area.
    pub fn fits(&self) -> bool {
        self.pos + (HEADER + self.body.len()) as u64 <= PREALLOC
    }

    /// Bytes written since the last rewind.
    pub fn used(&self) -> u64 {
        self.pos
    }

    /// Writes the staged ops as one frame and `fdatasync`s the file. The staged ops are
    /// cleared either way.
    pub fn write(&mut self) -> std::io::Result<()> {
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        let mut frame = Vec::with_capacity(HEADER + self.body.len());
        frame.extend_from_slice(MAGIC);
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(&lsn.to_be_bytes());
        frame.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        frame.append(&mut self.body);
        let crc = crc32fast::hash(&frame[8..]);
        frame[4..8].copy_from_slice(&crc.to_be_bytes());
        self.file.write_all_at(&frame, self.pos)?;
        self.file.sync_data()?;
        self.pos += frame.len() as u64;
        Ok(())
    }

    /// The last lsn taken: a checkpoint covers every frame up to it.
    pub fn last_lsn(&self) -> u64 {
        self.next_lsn - 1
    }

    /// After a checkpoint: the next frame goes at offset 0 again.
    pub fn rewind(&mut self) {
        self.pos = 0;
        self.body.clear();
    }
}

fn create(path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension("wal.tmp");
    let mut f = File::create(&tmp)?;
    let zeros = vec![0u8; 1024 * 1024];
    let mut left = PREALLOC;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Every intact frame in `bytes`, in file order. Damaged or stale bytes are skipped by
/// looking for the next magic.
pub fn parse(bytes: &[u8]) -> Vec<Frame> {
    parse_at(bytes)
        .into_iter()
        .map(|(l, ops, _)| (l, ops))
        .collect()
}

/// As [`parse`], with the offset where each frame ends.
fn parse_at(bytes: &[u8]) -> Vec<(u64, Vec<Op>, usize)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(off) = find(&bytes[at..], MAGIC) {
        let start = at + off;
        match frame_at(&bytes[start..]) {
            Some((lsn, ops, len)) => {
                at = start + len;
                out.push((lsn, ops, at));
            }
            None => at = start + 1,
        }
    }
    out
}

/// The frame at the start of `b`: (lsn, ops, bytes taken).
fn frame_at(b: &[u8]) -> Option<(u64, Vec<Op>, usize)> {
    if b.len() < HEADER {
        return None;
    }
    let crc = u32::from_be_bytes(b[4..8].try_into().ok()?);
    let lsn = u64::from_be_bytes(b[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(b[16..20].try_into().ok()?) as usize;
    let end = HEADER.checked_add(len)?;
    if end > b.len() || crc32fast::hash(&b[8..end]) != crc {
        return None;
    }
    Some((lsn, ops(&b[HEADER..end])?, end))
}

fn ops(mut b: &[u8]) -> Option<Vec<Op>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    fn be_u32(b: &mut &[u8]) -> Option<usize> {
        Some(u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize)
    }
    let mut out = Vec::new();
    while let Some(&kind) = b.first() {
        b = &b[1..];
        match kind {
            OP_BATCH => {
                let n = be_u32(&mut b)?;
                out.push(Op::Batch(take(&mut b, n)?.to_vec()));
            }
            OP_RETAIN => {
                let qos = *take(&mut b, 1)?.first()?;
                let tl = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?) as usize;
                let topic = std::str::from_utf8(take(&mut b, tl)?).ok()?.to_string();
                let pl = be_u32(&mut b)?;
                let payload = take(&mut b, pl)?.to_vec();
                out.push(Op::Retain {
                    topic,
                    qos,
                    payload,
                });
            }
            OP_CURSOR => {
                let c = u64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?);
                out.push(Op::Cursor(c));
            }
            _ => return None,
        }
    }
    Some(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_replay_past_a_floor() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, frames) = Wal::open(dir.path(), 0).unwrap();
        assert!(frames.is_empty());
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE)).unwrap().len(),
            PREALLOC
        );
        w.stage_batch(b"first batch");
        w.stage_retain("a/b", 1, b"kept");
        w.write().unwrap();
        w.stage_batch(b"second");
        w.stage_cursor(7);
        w.write().unwrap();
        assert!(!w.staged());
        drop(w);
        let (w, frames) = Wal::open(dir.path(), 0).unwrap();
        assert_eq!(
            frames,
            vec![
                (
                    1,
                    vec![
                        Op::Batch(b"first batch".to_vec()),
                        Op::Retain {
                            topic: "a/b".into(),
                            qos: 1,
                            payload: b"kept".to_vec()
                        }
                    ]
                ),
                (2, vec![Op::Batch(b"second".to_vec()), Op::Cursor(7)]),
            ]
        );
        assert_eq!(w.last_lsn(), 2);
        // Frames above the floor are not checkpointed: new ones go after them.
        assert_eq!(
            w.used(),
            2 * HEADER as u64 + (1 + 4 + 11) + (1 + 1 + 2 + 3 + 4 + 4) + (1 + 4 + 6) + (1 + 8)
        );
        // A floor above what the file holds moves the next lsn past it.
        let (w, _) = Wal::open(dir.path(), 9).unwrap();
        assert_eq!(w.last_lsn(), 9);
    }

    #[test]
    fn a_rewound_file_keeps_older_frames_behind_the_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), 0).unwrap();
        for i in 0..3u8 {
            w.stage_batch(&[i; 100]);
            w.write().unwrap();
        }
        w.rewind();
        w.stage_batch(&[9; 10]);
        w.write().unwrap();
        drop(w);
        let (_, frames) = Wal::open(dir.path(), 0).unwrap();
        let lsns: Vec<u64> = frames.iter().map(|(l, _)| *l).collect();
        // The new frame (lsn 4) first, then the old frames it did not overwrite; the
        // caller replays only those above its checkpoint lsn (3).
        assert_eq!(lsns[0], 4);
        assert!(lsns[1..].iter().all(|l| *l <= 3));
    }

    #[test]
    fn damaged_and_torn_frames_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), 0).unwrap();
        for i in 0..3u8 {
            w.stage_batch(&[i; 64]);
            w.write().unwrap();
        }
        drop(w);
        let path = dir.path().join(FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let frame = HEADER + 1 + 4 + 64;
        bytes[frame + HEADER + 10] ^= 0x40; // the second frame's body
        bytes.truncate(2 * frame + frame / 2); // the third is torn
        let frames = parse(&bytes);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, 1);
    }

    #[test]
    fn parsing_arbitrary_bytes_never_panics() {
        let mut bytes = Vec::new();
        for i in 0..5000u32 {
            bytes.extend_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
            if i % 97 == 0 {
                bytes.extend_from_slice(MAGIC);
            }
        }
        let _ = parse(&bytes);
    }
}
