//! Pseudo-terminal pairs that stand in for serial ports, made in-process: nothing to install.
//!
//! A [`PtyPair`] is one openpty(3) pair, made by `tokio_serial::SerialStream::pair()`
//! (`posix_openpt` + `grantpt` + `unlockpt`, then `cfmakeraw` on the slave: raw, no echo).
//! The gateway opens [`PtyPair::gw`], a stable symlink in the test's temp dir to the slave's
//! `/dev/pts/N`; the test plays the device on the master ([`PtyPair::device`]). Baud rate,
//! parity and data bits the gateway sets are accepted by a pty and ignored.
//!
//! Unplugging closes the master: every open slave fd (the gateway's) is hung up, so its
//! reads end (EOF/EIO) and its writes fail, and the `/dev/pts/N` node disappears; the
//! symlink is removed too, so reopening fails with "cannot open <gw>". Plugging back in
//! makes a new pair (a different `/dev/pts/M`) and points the same symlink at it. That is
//! what killing and restarting `socat pty,raw,echo=0,link=A pty,raw,echo=0,link=B` did to
//! the gateway's end: socat's exit closed its masters and removed its links.
//!
//! Invariant: while plugged in, the pair keeps one slave fd of its own open (never read).
//! A pty master reads EIO whenever no slave fd is open, so without it the device side would
//! see a spurious "unplug" each time the gateway closes its port to reopen it.

use std::path::{Path, PathBuf};

use tokio_serial::{SerialPort, SerialStream};

/// A pty pair: the gateway opens `gw`; the test is the device on the master.
pub struct PtyPair {
    /// The path the gateway's config names: a symlink to the current slave.
    pub gw: PathBuf,
    line: Option<Line>,
    _dir: Option<tempfile::TempDir>,
}

/// One plugged-in pair.
struct Line {
    /// The device's end, until [`PtyPair::device`] hands it out.
    master: Option<SerialStream>,
    /// Keeps the master readable while the gateway has the port closed (see the header).
    _slave: SerialStream,
}

impl PtyPair {
    /// A plugged-in pair whose symlink lives in a temp dir of its own (named `<dir>/a`).
    /// Must be called inside a tokio runtime.
    pub fn new() -> PtyPair {
        let dir = tempfile::tempdir().unwrap();
        let mut p = PtyPair::unplugged(dir.path(), "a");
        p._dir = Some(dir);
        p.plug_in();
        p
    }

    /// A plugged-in pair whose symlink is `<dir>/<name>-gw`. Must be called inside a tokio
    /// runtime.
    pub fn start(dir: &Path, name: &str) -> PtyPair {
        let mut p = PtyPair::unplugged(dir, &format!("{name}-gw"));
        p.plug_in();
        p
    }

    fn unplugged(dir: &Path, link: &str) -> PtyPair {
        PtyPair {
            gw: dir.join(link),
            line: None,
            _dir: None,
        }
    }

    /// Makes a new pair and points `gw` at its slave.
    pub fn plug_in(&mut self) {
        assert!(self.line.is_none(), "already plugged in");
        let (master, slave) = SerialStream::pair().expect("openpty: a new pseudo-terminal pair");
        let slave_path = slave.name().expect("the slave's /dev/pts path");
        let _ = std::fs::remove_file(&self.gw);
        std::os::unix::fs::symlink(&slave_path, &self.gw)
            .unwrap_or_else(|e| panic!("symlink {} -> {slave_path}: {e}", self.gw.display()));
        self.line = Some(Line {
            master: Some(master),
            _slave: slave,
        });
    }

    /// Closes the device's end (if [`PtyPair::device`] still holds it here) and the pair's
    /// own slave fd, and removes the symlink. The gateway's open port is hung up.
    pub fn unplug(&mut self) {
        if let Some(mut line) = self.line.take() {
            drop(line.master.take());
        }
        let _ = std::fs::remove_file(&self.gw);
    }

    /// The device's end (the master). Handed out once per plug-in; dropping it closes the
    /// device side, which the gateway sees as the device being unplugged (as when the last
    /// holder of socat's device end closed it).
    pub fn device(&mut self) -> SerialStream {
        self.line
            .as_mut()
            .expect("plugged in")
            .master
            .take()
            .expect("the device end is handed out once per plug-in")
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.unplug();
    }
}
