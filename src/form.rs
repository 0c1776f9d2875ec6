//! `application/x-www-form-urlencoded` values: URL queries (`?device=...` on OTA image URLs)
//! and form bodies (the operator page's sign-in). A leaf: it imports nothing from the crate.

/// Percent-encodes `s` for a URL query value (everything but `A-Z a-z 0-9 - . _ ~`).
pub fn encode_query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The value of `key` in a URL query (`a=1&b=2`), percent-decoded; `None` if absent or not
/// valid UTF-8 once decoded.
pub fn query_value(query: &str, key: &str) -> Option<String> {
    let raw = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?;
    let mut out = Vec::with_capacity(raw.len());
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = raw.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_round_trip() {
        for id in ["d1", "pump 7", "a&b=c", "ünï%", "x?y"] {
            let q = format!("z=1&device={}", encode_query_value(id));
            assert_eq!(query_value(&q, "device").as_deref(), Some(id), "{q}");
        }
        assert_eq!(query_value("device=%zz", "device"), None);
        assert_eq!(query_value("device=%4", "device"), None);
        assert_eq!(query_value("devices=a", "device"), None);
        assert_eq!(query_value("", "device"), None);
    }
}
