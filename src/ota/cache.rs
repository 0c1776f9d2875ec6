//! The firmware cache on disk: content-addressed image files and their verification.
//!
//! Owns the files under `ota.cache_dir`:
//! - `<sha256>.bin`: a verified image, named by the sha256 of its bytes;
//! - `<key>.part`: a download or an MQTT push in progress (`key` is the sha256, or `md5-<hex>`
//!   for legacy images); its length is where an HTTP download resumes;
//! - `state.json`: the OTA state (see [`super::state`]).
//!
//! Invariants:
//! - a `.bin` file only ever appears by `rename` of a `.part` file whose size and hash were
//!   checked, after the data and the directory were fsynced: a power cut leaves either no
//!   `.bin` or a complete one;
//! - nothing is served from a `.bin` file the running process has not hashed itself (at start
//!   every cached image is re-hashed before it is served; a mismatch deletes it);
//! - all functions here block (file I/O, hashing): callers run them in `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use md5::Digest;

/// Why a cache operation failed. The manager reports it up and retries or refetches.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// File I/O failed (disk full, permissions): the image stays unavailable; the operator
    /// checks `ota.cache_dir`.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The bytes are not the image announced: the file was deleted and must be fetched again.
    #[error("verification failed: {0}")]
    Mismatch(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Digests of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// Bytes hashed.
    pub size: u64,
    /// sha256, lowercase hex.
    pub sha256: String,
    /// md5, lowercase hex.
    pub md5: String,
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// sha256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// Hashes a whole file (sha256 and md5 in one pass).
pub fn digest_file(path: &Path) -> Result<Digests, CacheError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut md5 = md5::Md5::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        md5.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Digests {
        size,
        sha256: hex(sha.finish().as_ref()),
        md5: hex(&md5.finalize()),
    })
}

/// What an image must be.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Size in bytes.
    pub size: u64,
    /// sha256 hex, if the cloud gave one.
    pub sha256: Option<String>,
    /// md5 hex (legacy), if the cloud gave only that.
    pub md5: Option<String>,
}

impl Expect {
    /// Checks digests against the expectation.
    pub fn check(&self, d: &Digests) -> Result<(), CacheError> {
        if d.size != self.size {
            return Err(CacheError::Mismatch(format!(
                "size {} instead of {}",
                d.size, self.size
            )));
        }
        if let Some(s) = &self.sha256 {
            if *s != d.sha256 {
                return Err(CacheError::Mismatch(format!(
                    "sha256 {} instead of {s}",
                    d.sha256
                )));
            }
        } else if let Some(m) = &self.md5 {
            if *m != d.md5 {
                return Err(CacheError::Mismatch(format!(
                    "md5 {} instead of {m}",
                    d.md5
                )));
            }
        }
        Ok(())
    }
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Opens (creates) the directory.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a verified image.
    pub fn bin(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.bin"))
    }

    /// Path of the partial file of image `key`.
    pub fn part(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.part", key.replace(':', "-")))
    }

    /// Length of the partial file (0 if none).
    pub fn part_len(&self, key: &str) -> u64 {
        fs::metadata(self.part(key)).map(|m| m.len()).unwrap_or(0)
    }

    /// Deletes the partial file.
    pub fn drop_part(&self, key: &str) {
        let _ = fs::remove_file(self.part(key));
    }

    /// Verifies the partial file of `key` against `expect` and, if it matches, installs it as
    /// `<sha256>.bin` (fsync, rename, fsync the directory). A mismatch deletes the partial
    /// file. Returns the digests.
    pub fn install(&self, key: &str, expect: &Expect) -> Result<Digests, CacheError> {
        let part = self.part(key);
        let d = digest_file(&part)?;
        if let Err(e) = expect.check(&d) {
            self.drop_part(key);
            return Err(e);
        }
        File::open(&part)
            .and_then(|f| f.sync_all())
            .map_err(io(&part))?;
        let bin = self.bin(&d.sha256);
        fs::rename(&part, &bin).map_err(io(&bin))?;
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(d)
    }

    /// Re-hashes a cached image; deletes it if it is not `sha256` of `size` bytes.
    pub fn reverify(&self, sha256: &str, size: u64) -> Result<(), CacheError> {
        let bin = self.bin(sha256);
        let d = digest_file(&bin)?;
        let expect = Expect {
            size,
            sha256: Some(sha256.to_string()),
            md5: None,
        };
        expect.check(&d).inspect_err(|_| {
            let _ = fs::remove_file(&bin);
        })
    }

    /// Opens the verified image `<sha256>.bin` for serving.
    pub fn open_bin(&self, sha256: &str) -> Opened {
        let path = self.bin(sha256);
        let file = File::open(&path).map_err(|e| e.to_string());
        Opened { path, file }
    }

    /// Deletes a cached image.
    pub fn remove(&self, sha256: &str) {
        let _ = fs::remove_file(self.bin(sha256));
    }

    /// Writes `data` at `offset` of the partial file of `key` (MQTT push).
    pub fn write_part_at(&self, key: &str, offset: u64, data: &[u8]) -> Result<(), CacheError> {
        use std::os::unix::fs::FileExt;
        let part = self.part(key);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&part)
            .map_err(io(&part))?;
        f.write_all_at(data, offset).map_err(io(&part))
    }

    /// Writes `bytes` to `name` atomically (temp file, fsync, rename).
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let dst = self.dir.join(name);
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &dst).map_err(io(&dst))?;
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Reads `name` if it exists.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let p = self.dir.join(name);
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }
}

/// A verified image file opened for serving, or why it could not be opened.
#[derive(Debug)]
pub struct Opened {
    /// `<sha256>.bin`.
    pub path: PathBuf,
    /// The open file.
    pub file: Result<File, String>,
}

/// Reads `len` bytes at `offset` of an open image file.
pub fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Least-recently-used eviction: which of `candidates` (`(key, size, last_used_ms)`, all
/// evictable) to delete so that `used - freed + need <= quota`. `None` if even all of them
/// are not enough.
pub fn plan_eviction(
    candidates: &[(String, u64, u64)],
    used: u64,
    need: u64,
    quota: u64,
) -> Option<Vec<String>> {
    let mut c: Vec<_> = candidates.to_vec();
    c.sort_by_key(|(_, _, t)| *t);
    let mut used = used;
    let mut out = Vec::new();
    for (k, size, _) in c {
        if used + need <= quota {
            break;
        }
        used = used.saturating_sub(size);
        out.push(k);
    }
    (used + need <= quota).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_checks_then_renames() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path()).unwrap();
        let data = b"hello firmware".to_vec();
        let sha = sha256_hex(&data);
        fs::write(c.part(&sha), b"hello firmwarX").unwrap();
        let e = Expect {
            size: data.len() as u64,
            sha256: Some(sha.clone()),
            md5: None,
        };
        assert!(matches!(c.install(&sha, &e), Err(CacheError::Mismatch(_))));
        assert_eq!(c.part_len(&sha), 0, "a bad part is deleted");
        fs::write(c.part(&sha), &data).unwrap();
        let dg = c.install(&sha, &e).unwrap();
        assert_eq!(dg.sha256, sha);
        assert_eq!(fs::read(c.bin(&sha)).unwrap(), data);
        c.reverify(&sha, data.len() as u64).unwrap();
        fs::write(c.bin(&sha), b"hello firmwarY").unwrap();
        assert!(c.reverify(&sha, data.len() as u64).is_err());
        assert!(!c.bin(&sha).exists(), "a corrupted image is deleted");
    }

    #[test]
    fn md5_legacy_check() {
        let data = b"abc";
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path()).unwrap();
        fs::write(c.part("md5:x"), data).unwrap();
        let e = Expect {
            size: 3,
            sha256: None,
            md5: Some("900150983cd24fb0d6963f7d28e17f72".into()),
        };
        let dg = c.install("md5:x", &e).unwrap();
        assert_eq!(dg.sha256, sha256_hex(data));
    }

    #[test]
    fn lru_evicts_oldest_first_and_only_enough() {
        let c = vec![
            ("new".to_string(), 40, 300),
            ("old".to_string(), 40, 100),
            ("mid".to_string(), 40, 200),
        ];
        assert_eq!(
            plan_eviction(&c, 120, 30, 100),
            Some(vec!["old".into(), "mid".into()])
        );
        assert_eq!(plan_eviction(&c, 120, 0, 120), Some(vec![]));
        assert_eq!(plan_eviction(&c, 120, 200, 100), None);
    }
}
