//! Downloads an image once from the cloud's firmware store over HTTPS, resuming with `Range`.
//!
//! Owns one download: a minimal HTTP/1.1 GET over tokio-rustls (ring provider, roots from
//! `ota.fetch_ca_file`, default `cloud.ca_file`; no plaintext and no "insecure" switch),
//! appending to `<cache_dir>/<key>.part`.
//!
//! Protocol handled: if the partial file holds `N > 0` bytes the request carries
//! `Range: bytes=N-`; `206` with `Content-Range: bytes N-...` appends, `200` starts over from
//! 0, `416` means the partial file is not a prefix of the image (it is discarded); any other
//! status is an error. The body is read by `Content-Length` (or to EOF); chunked encoding is
//! refused. A read that stalls longer than `ota.fetch_timeout` cuts the attempt; the next one
//! resumes where the file ends. Verification (size + hash) is not done here but by
//! [`super::cache::Cache::install`] once the body is complete.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why a download attempt failed. The caller retries with backoff (resuming), up to
/// `ota.fetch_attempts`.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL is not `https://host[:port]/path`.
    #[error("bad url {0:?}")]
    Url(String),
    /// The CA file is unusable: fix `ota.fetch_ca_file` (or `cloud.ca_file`).
    #[error("ota.fetch_ca_file {path}: {why}")]
    Ca {
        /// File.
        path: String,
        /// Why.
        why: String,
    },
    /// Network, TLS or disk error; the partial file is kept for the resume.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No byte for `ota.fetch_timeout`.
    #[error("stalled for {0:?}")]
    Timeout(Duration),
    /// The connection ended (closed, reset, or without TLS close_notify) before the body was
    /// complete; the partial file is kept for the resume. Bytes of the whole image.
    #[error("connection closed after {got} of {total} bytes")]
    Cut {
        /// Bytes of the image held after this attempt.
        got: u64,
        /// The image's size.
        total: u64,
    },
    /// The server answered something unusable.
    #[error("server: {0}")]
    Http(String),
}

/// Whether a read error means the server's side went away (closed without TLS close_notify,
/// reset, aborted), which is said as such rather than in the TLS library's words.
fn is_cut(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
    )
}

/// A parsed `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// Host name or IP.
    pub host: String,
    /// Port (443 by default).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses an `https://` URL.
    pub fn parse(url: &str) -> Result<Url, FetchError> {
        let bad = || FetchError::Url(url.to_string());
        let rest = url.strip_prefix("https://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or_else(bad)?;
            (h, p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => 443,
        };
        if host.is_empty() || path.contains([' ', '\r', '\n']) {
            return Err(bad());
        }
        Ok(Url {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// TLS client config trusting the CAs in `ca_file`.
pub fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, FetchError> {
    let ca_err = |why: String| FetchError::Ca {
        path: ca_file.display().to_string(),
        why,
    };
    let roots = crate::tls::roots("ota.fetch_ca_file", ca_file).map_err(|e| match e {
        crate::tls::TlsError::File { why, .. } | crate::tls::TlsError::Invalid { why, .. } => {
            ca_err(why)
        }
    })?;
    let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// What one attempt achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// Bytes received in this attempt.
    pub received: u64,
    /// Whether it resumed (206) rather than started from 0.
    pub resumed: bool,
}

async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, FetchError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(FetchError::Timeout(limit)),
    }
}

/// One attempt: GETs `url` into `part` (resuming from its length), until the body is complete
/// or the connection fails. `expected_size` bounds the body. `on_bytes` is told of every
/// write (for the metrics).
pub async fn download(
    url: &Url,
    tls: Arc<rustls::ClientConfig>,
    part: &Path,
    expected_size: u64,
    timeout: Duration,
    mut on_bytes: impl FnMut(u64),
) -> Result<Attempt, FetchError> {
    let mut have = tokio::fs::metadata(part)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    if have > expected_size {
        tokio::fs::remove_file(part).await?;
        have = 0;
    }
    let tcp = timed(timeout, TcpStream::connect((url.host.as_str(), url.port))).await?;
    let _ = tcp.set_nodelay(true);
    let name =
        ServerName::try_from(url.host.clone()).map_err(|_| FetchError::Url(url.host.clone()))?;
    let tls = timed(timeout, TlsConnector::from(tls).connect(name, tcp)).await?;
    fetch_over(tls, url, part, have, expected_size, timeout, &mut on_bytes).await
}

async fn fetch_over<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    url: &Url,
    part: &Path,
    have: u64,
    expected_size: u64,
    timeout: Duration,
    on_bytes: &mut impl FnMut(u64),
) -> Result<Attempt, FetchError> {
    let host = if url.port == 443 {
        url.host.clone()
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fieldgate/{}\r\nAccept-Encoding: identity\r\nConnection: close\r\n",
        url.path,
        env!("CARGO_PKG_VERSION")
    );
    if have > 0 {
        req.push_str(&format!("Range: bytes={have}-\r\n"));
    }
    req.push_str("\r\n");
    timed(timeout, s.write_all(req.as_bytes())).await?;
    timed(timeout, s.flush()).await?;

    // Response head.
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            return Err(FetchError::Http("response head over 16 KiB".into()));
        }
        let n = timed(timeout, s.read(&mut tmp)).await?;
        if n == 0 {
            return Err(FetchError::Http(
                "connection closed before the response head".into(),
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| FetchError::Http("no status line".into()))?;
    let mut content_length = None;
    let mut content_range_start = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => content_length = v.parse::<u64>().ok(),
            "content-range" => {
                content_range_start = v
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split('-').next())
                    .and_then(|a| a.trim().parse::<u64>().ok())
            }
            "transfer-encoding" if !v.eq_ignore_ascii_case("identity") => {
                return Err(FetchError::Http(format!(
                    "transfer-encoding {v} not supported"
                )))
            }
            _ => {}
        }
    }
    let (start, resumed) = match status {
        206 if have > 0 && content_range_start == Some(have) => (have, true),
        206 => {
            return Err(FetchError::Http(format!(
                "206 for the wrong range ({content_range_start:?}, asked {have}-)"
            )))
        }
        200 => (0, false),
        416 => {
            tokio::fs::remove_file(part).await.ok();
            return Err(FetchError::Http(
                "416: the partial download is not a prefix of the image; starting over".into(),
            ));
        }
        s => return Err(FetchError::Http(format!("status {s}"))),
    };
    let want = match content_length {
        Some(n) if start + n > expected_size => {
            return Err(FetchError::Http(format!(
                "body of {n} bytes from {start} exceeds the announced size {expected_size}"
            )))
        }
        Some(n) => n,
        None => expected_size - start,
    };
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(!resumed)
        .append(resumed)
        .open(part)
        .await?;
    let mut got = 0u64;
    let first = &buf[head_end..];
    let take = (first.len() as u64).min(want) as usize;
    if take > 0 {
        f.write_all(&first[..take]).await?;
        got += take as u64;
        on_bytes(take as u64);
    }
    let result = loop {
        if got >= want {
            break Ok(());
        }
        let cut = |got: u64| FetchError::Cut {
            got: start + got,
            total: start + want,
        };
        let n = match timed(timeout, s.read(&mut tmp)).await {
            Ok(n) => n,
            Err(FetchError::Io(e)) if is_cut(&e) => break Err(cut(got)),
            Err(e) => break Err(e),
        };
        if n == 0 {
            break if content_length.is_some() {
                Err(cut(got))
            } else {
                Ok(())
            };
        }
        let n = (n as u64).min(want - got) as usize;
        f.write_all(&tmp[..n]).await?;
        got += n as u64;
        on_bytes(n as u64);
    };
    // What arrived is kept (and made durable) either way: the next attempt resumes after it.
    f.flush().await?;
    f.sync_data().await?;
    result.map(|_| Attempt {
        received: got,
        resumed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Url::parse("https://127.0.0.1:8443/fw/a.bin?x=1").unwrap(),
            Url {
                host: "127.0.0.1".into(),
                port: 8443,
                path: "/fw/a.bin?x=1".into()
            }
        );
        assert_eq!(Url::parse("https://h").unwrap().port, 443);
        assert_eq!(Url::parse("https://[::1]:9/x").unwrap().host, "::1");
        assert!(Url::parse("http://h/x").is_err());
        assert!(Url::parse("https://h:x/").is_err());
        assert!(Url::parse("https:///x").is_err());
    }

    /// A canned response over an in-memory pipe: the parser, the resume and the cut.
    async fn run(
        response: Vec<u8>,
        have: &[u8],
        size: u64,
    ) -> (Result<Attempt, FetchError>, Vec<u8>, String) {
        let d = tempfile::tempdir().unwrap();
        let part = d.path().join("x.part");
        if !have.is_empty() {
            std::fs::write(&part, have).unwrap();
        }
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let srv = tokio::spawn(async move {
            let mut req = vec![0u8; 4096];
            let n = server.read(&mut req).await.unwrap();
            server.write_all(&response).await.unwrap();
            String::from_utf8_lossy(&req[..n]).to_string()
        });
        let url = Url::parse("https://h/fw").unwrap();
        let r = fetch_over(
            client,
            &url,
            &part,
            have.len() as u64,
            size,
            Duration::from_secs(5),
            &mut |_| {},
        )
        .await;
        let req = srv.await.unwrap();
        (r, std::fs::read(&part).unwrap_or_default(), req)
    }

    #[tokio::test]
    async fn full_resume_and_cut() {
        let (r, data, req) = run(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            b"",
            5,
        )
        .await;
        assert_eq!(
            r.unwrap(),
            Attempt {
                received: 5,
                resumed: false
            }
        );
        assert_eq!(data, b"hello");
        assert!(!req.contains("Range"));

        let (r, data, req) = run(
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 2-4/5\r\nContent-Length: 3\r\n\r\nllo".to_vec(),
            b"he",
            5,
        )
        .await;
        assert_eq!(
            r.unwrap(),
            Attempt {
                received: 3,
                resumed: true
            }
        );
        assert_eq!(data, b"hello");
        assert!(req.contains("Range: bytes=2-\r\n"), "{req}");

        // 200 to a range request: start over.
        let (r, data, _) = run(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            b"XY",
            5,
        )
        .await;
        assert!(!r.unwrap().resumed);
        assert_eq!(data, b"hello");

        // Cut: what arrived is kept.
        let (r, data, _) = run(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel".to_vec(),
            b"",
            5,
        )
        .await;
        assert!(
            matches!(r, Err(FetchError::Cut { got: 3, total: 5 })),
            "{r:?}"
        );
        assert_eq!(data, b"hel");

        let (r, _, _) = run(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            b"",
            5,
        )
        .await;
        assert!(matches!(r, Err(FetchError::Http(_))));
        let (r, _, _) = run(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello".to_vec(),
            b"",
            5,
        )
        .await;
        assert!(
            matches!(r, Err(FetchError::Http(_))),
            "oversized body refused"
        );
    }
}
