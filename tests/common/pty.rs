//! Pseudo-terminal pairs that stand in for serial ports, made in-process: nothing to install.
//!
//! A [`PtyPair`] is one pseudo-terminal pair: the master opened from `/dev/ptmx` as a
//! `tokio_serial::SerialStream` (which puts the line in raw mode, no echo: termios calls on a
//! Linux pty master set the slave's), then `grantpt` + `unlockpt` + `ptsname_r`, then the
//! slave opened by its path. The gateway opens [`PtyPair::gw`], a stable symlink in the
//! test's temp dir to the slave's `/dev/pts/N`; the test plays the device on the master
//! ([`PtyPair::device`]). Baud rate, parity and data bits the gateway sets are accepted by a
//! pty and ignored.
//!
//! Unplugging closes the master: every open slave fd (the gateway's) is hung up, so its
//! reads end (EOF/EIO) and its writes fail, and the `/dev/pts/N` node disappears; the
//! symlink is removed too, so reopening fails with "cannot open <gw>". Plugging back in
//! makes a new pair (a different `/dev/pts/M`) and points the same symlink at it. That is
//! what killing and restarting `socat pty,raw,echo=0,link=A pty,raw,echo=0,link=B` did to
//! the gateway's end: socat's exit closed its masters and removed its links.
//!
//! Invariants:
//! - every fd of a pair is close-on-exec from the moment it is opened. The gateway under test
//!   is a child process, and a child inherits every fd without it: a gateway started while a
//!   pair exists (this test's, or a parallel test's in the same binary) would hold that pair's
//!   master, so closing the test's copy would not hang the line up and the gateway's port
//!   would stay open and silent. That is why the pair is not `SerialStream::pair()`:
//!   serialport's `TTYPort::pair` opens both ends without `O_CLOEXEC`, and setting it
//!   afterwards leaves a window in which another test thread may spawn a gateway;
//! - while plugged in, the pair keeps one slave fd of its own open (never read). A pty master
//!   reads EIO whenever no slave fd is open, so without it the device side would see a
//!   spurious "unplug" each time the gateway closes its port to reopen it.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use tokio_serial::SerialStream;

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
    _slave: File,
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
        let (master, slave, slave_path) =
            open_pair().unwrap_or_else(|e| panic!("a new pseudo-terminal pair: {e}"));
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

/// A new pty pair, every fd close-on-exec (see the header): the master, the slave, and the
/// slave's path.
fn open_pair() -> io::Result<(SerialStream, File, String)> {
    // serialport opens with O_CLOEXEC. Not exclusive: that would flock /dev/ptmx itself (every
    // master shares its inode), so a second pair could not be made while the first exists.
    let builder = tokio_serial::new("/dev/ptmx", 115_200).exclusive(false);
    let master = SerialStream::open(&builder).map_err(io::Error::other)?;
    let fd = master.as_raw_fd();
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `fd` is the open master for the whole block; `name` is a writable buffer of
    // the length passed, which ptsname_r NUL-terminates on success.
    let slave_path = unsafe {
        check(libc::grantpt(fd))?;
        check(libc::unlockpt(fd))?;
        // ptsname_r returns the error number itself rather than setting errno.
        match libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) {
            0 => CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    };
    // std opens every file with O_CLOEXEC.
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)?;
    Ok((master, slave, slave_path))
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.unplug();
    }
}
