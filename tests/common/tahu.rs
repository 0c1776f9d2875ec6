//! Eclipse Tahu's JavaScript Sparkplug B codec (`sparkplug-payload` from npm), run by node:
//! the independent implementation the Sparkplug tests decode what reaches the cloud with,
//! and encode a host's commands with. `tests/sparkplug_js/decode.js` is the bridge; the
//! packages are installed from its lock file (`npm ci`) the first time a test needs them.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Once;

use serde_json::{json, Value as Json};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sparkplug_js")
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if dir().join("node_modules/sparkplug-payload").exists() {
            return;
        }
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(dir())
            .output()
            .expect("the Sparkplug tests need node and npm (apt-get install nodejs npm)");
        assert!(
            out.status.success(),
            "npm ci --prefix tests/sparkplug_js failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Runs decode.js over `lines` (one JSON request each) and returns its answers in order.
fn run(lines: &[Json]) -> Vec<Json> {
    install();
    let mut child = Command::new("node")
        .arg(dir().join("decode.js"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (apt-get install nodejs)");
    let mut stdin = child.stdin.take().unwrap();
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    // A writer thread: node answers while it reads, and a large input fills both pipes.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "decode.js failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Json> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), lines.len(), "decode.js answered every line");
    answers
}

/// Decodes each `(topic, payload)` with Tahu: `{"topic", "payload"}` or `{"topic", "error"}`.
pub fn decode(msgs: &[(String, Vec<u8>)]) -> Vec<Json> {
    let lines: Vec<Json> = msgs
        .iter()
        .map(|(t, p)| json!({"topic": t, "hex": hex(p)}))
        .collect();
    run(&lines)
}

/// Encodes a payload as Tahu takes it (`{"timestamp":..,"metrics":[{"name","type","value"}]}`).
pub fn encode(payload: Json) -> Vec<u8> {
    let a = run(&[json!({"topic": "", "encode": payload})]);
    let h = a[0]["hex"].as_str().expect("encoded");
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
