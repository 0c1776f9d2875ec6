//! (f) The command line: bad configuration lists every problem and exits 64; the shipped
//! configs validate; print-config round-trips; --version and --help answer.
//! CI also runs these against the ARM images under qemu (see `common::fieldgate_command`).

mod common;

use std::path::Path;
use std::process::Output;

fn fieldgate(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = common::fieldgate_command();
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const BAD: &str = r#"
surprise = true
[gateway]
id = "has/slash"
shutdown_grace = "soon"
[broker.listeners.default]
allow_anonymous = true
listen = "127.0.0.1:9183"
[store]
max_bytes = 10
commit_interval = "30s"
[cloud]
enabled = true
ca_file = "/nonexistent/ca.pem"
client_key_file = "/nonexistent/key.pem"
[uplink]
forward = ["a/#/b"]
"#;

#[test]
fn bad_config_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, BAD).unwrap();
    let p = path.to_str().unwrap();
    for cmd in ["check-config", "run"] {
        let o = fieldgate(&[cmd, "-c", p], &[]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(64), "{cmd}: {out}");
        for key in [
            "surprise:",
            "gateway:", // shutdown_grace fails to parse: the section is named with the value
            "store.max_bytes:",
            "store.commit_interval:",
            "cloud.host:",
            "cloud.ca_file:",
            "cloud.client_cert_file:",
            "uplink.forward[0]:",
        ] {
            assert!(out.contains(key), "{cmd}: {key} not reported in:\n{out}");
        }
    }
}

#[test]
fn semantic_problems_are_all_listed_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[gateway]\nid = \"\"\n[broker.listeners.default]\nlisten = \"127.0.0.1:9183\"\n[cloud]\nenabled = true\n",
    )
    .unwrap();
    let o = fieldgate(&["check-config", "-c", path.to_str().unwrap()], &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(64), "{out}");
    for key in [
        "gateway.id:",
        "http.listen:",
        "cloud.host:",
        "cloud.ca_file:",
    ] {
        assert!(out.contains(key), "{key} missing:\n{out}");
    }
    assert!(
        out.contains("clashes with broker.listeners.default.listen"),
        "{out}"
    );
}

#[test]
fn bad_environment_override_is_named() {
    let o = fieldgate(
        &["check-config"],
        &[
            ("FIELDGATE__STORE__MAX_BYTES", "lots"),
            ("FIELDGATE__NOPE__X", "1"),
        ],
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(64), "{out}");
    assert!(out.contains("store:"), "{out}");
    assert!(out.contains("nope:"), "{out}");
}

#[test]
fn missing_config_file_is_a_usage_error() {
    let o = fieldgate(&["run", "-c", "/nonexistent/fieldgate.toml"], &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(text(&o).contains("does not exist"));
}

#[test]
fn defaults_validate_and_print_config_round_trips() {
    let o = fieldgate(&["check-config"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let printed = fieldgate(&["print-config"], &[("FIELDGATE__GATEWAY__ID", "pi-42")]);
    assert!(printed.status.success());
    let toml = String::from_utf8(printed.stdout).unwrap();
    assert!(toml.contains("id = \"pi-42\""), "{toml}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("printed.toml");
    std::fs::write(&path, &toml).unwrap();
    let again = fieldgate(&["print-config", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), toml);
}

#[test]
fn shipped_configs_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pki = common::Pki::new();
    let (ca, cert, key) = (
        pki.ca.display().to_string(),
        pki.client.cert.display().to_string(),
        pki.client.key.display().to_string(),
    );
    let mut n = 0;
    for entry in std::fs::read_dir(root.join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        n += 1;
        // Example certificate paths point at /etc/fieldgate; substitute real files.
        let o = fieldgate(
            &["check-config", "-c", path.to_str().unwrap()],
            &[
                ("FIELDGATE__CLOUD__CA_FILE", &ca),
                ("FIELDGATE__CLOUD__CLIENT_CERT_FILE", &cert),
                ("FIELDGATE__CLOUD__CLIENT_KEY_FILE", &key),
            ],
        );
        assert!(o.status.success(), "{}: {}", path.display(), text(&o));
    }
    assert!(n >= 2, "expected at least two shipped configs");
}

#[test]
fn version_and_help() {
    let v = fieldgate(&["--version"], &[]);
    assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")));
    let h = fieldgate(&["--help"], &[]);
    let h = String::from_utf8_lossy(&h.stdout);
    for cmd in ["run", "check-config", "print-config"] {
        assert!(h.contains(cmd), "{h}");
    }
}

/// The README's field-device example is a valid configuration (README and code in step).
#[test]
fn readme_field_device_example_validates() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("### Example: a Modbus meter")
        .expect("README example section");
    let body = &readme[start..];
    let toml_start = body.find("```toml\n").expect("toml block") + "```toml\n".len();
    let toml_len = body[toml_start..].find("```").expect("end of toml block");
    let example = &body[toml_start..toml_start + toml_len];
    assert!(example.contains("[[modbus]]") && example.contains("[[serial]]"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("example.toml");
    std::fs::write(&path, example).unwrap();
    let o = fieldgate(&["check-config", "-c", path.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}\n{example}", text(&o));
}

/// The README's `[ota]` example is a valid configuration.
#[test]
fn readme_ota_example_validates() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("## Firmware updates (OTA)")
        .expect("README OTA section");
    let body = &readme[start..];
    let toml_start = body.find("```toml\n").expect("toml block") + "```toml\n".len();
    let toml_len = body[toml_start..].find("```").expect("end of toml block");
    let example = &body[toml_start..toml_start + toml_len];
    assert!(example.contains("[ota]"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ota.toml");
    std::fs::write(&path, example).unwrap();
    let o = fieldgate(&["check-config", "-c", path.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}\n{example}", text(&o));
}

/// A certificate with another certificate's key is a configuration problem: `check-config`
/// says so (exit 64) instead of `run` failing later with exit 70.
#[test]
fn a_certificate_and_a_key_that_do_not_match_are_refused_by_check_config() {
    let pki = common::Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mismatch.toml");
    let config = format!(
        "[broker.listeners.tls]\nlisten = \"127.0.0.1:8884\"\nallow_anonymous = true\n\
         [broker.listeners.tls.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [cloud]\nenabled = true\nhost = \"localhost\"\nca_file = \"{}\"\n\
         client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        pki.server.cert.display(),
        pki.client.key.display(),
        pki.ca.display(),
        pki.client.cert.display(),
        pki.server.key.display(),
    );
    std::fs::write(&path, config).unwrap();
    for cmd in ["check-config", "run"] {
        let o = fieldgate(&[cmd, "-c", path.to_str().unwrap()], &[]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(64), "{cmd}: {out}");
        for key in [
            "broker.listeners.tls.tls.key_file:",
            "cloud.client_key_file:",
        ] {
            assert!(out.contains(key), "{cmd}: {key} not reported in:\n{out}");
        }
    }
}

/// A gateway without a cloud, on its own data dir; `uplink` is the `[uplink]` table.
fn local_only_config(ports: &common::GatewayPorts, data: &Path, uplink: toml::Table) -> String {
    common::GatewayConfig::local(ports, data)
        .set("gateway.id", "loc")
        .set("gateway.shutdown_grace", "3s")
        .with("uplink", uplink)
        .to_toml()
}

/// A gateway with no cloud keeps nothing for one when `uplink.forward = []` (a Modbus-only
/// gateway must not fill its disk), and says once at start when it does queue for a cloud
/// that is not configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_only_gateway_queues_nothing_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let ports = common::GatewayPorts::new();
    let conf = local_only_config(&ports, dir.path(), toml::toml! { forward = [] });
    let path = dir.path().join("local.toml");
    std::fs::write(&path, &conf).unwrap();
    let o = fieldgate(&["check-config", "-c", path.to_str().unwrap()], &[]);
    assert!(o.status.success(), "forward = [] refused:\n{}", text(&o));

    let gw = common::Gateway::start(&conf, &ports).await;
    common::publish_seq(ports.mqtt, "loc", 0..50, 32).await;
    assert_eq!(gw.metric("fieldgate_queue_records"), 0.0);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("local only"),
        "no word at start that nothing is queued:\n{log}"
    );

    // The default forward list with no cloud: queued, and said once.
    let data2 = tempfile::tempdir().unwrap();
    let ports = common::GatewayPorts::new();
    let conf = local_only_config(&ports, data2.path(), toml::Table::new());
    let gw = common::Gateway::start(&conf, &ports).await;
    common::publish_seq(ports.mqtt, "loc", 0..50, 32).await;
    assert_eq!(gw.metric("fieldgate_queue_records"), 50.0);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    let said = log.matches("no cloud configured").count();
    assert_eq!(
        said, 1,
        "want one warning about queueing for no cloud:\n{log}"
    );
    assert!(
        log.contains("uplink.forward = []"),
        "no hint at the fix:\n{log}"
    );
}

/// What the gateway writes to a pipe or a file (journald, a log file) has no ANSI colour
/// codes; and a second SIGTERM once the stop is complete does not turn exit 0 into 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_are_plain_and_a_late_second_signal_keeps_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let ports = common::GatewayPorts::new();
    let conf = local_only_config(&ports, dir.path(), toml::toml! { forward = [] });
    for round in 0..3 {
        let gw = common::Gateway::start(&conf, &ports).await;
        let pid = gw.pid().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        // Once the stop is logged as complete, signal again while the process exits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !gw.log_text().contains("fieldgate stopped") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let (status, log) = gw.terminate();
        assert!(
            !log.contains('\u{1b}'),
            "ANSI escape codes in a log written to a file:\n{log}"
        );
        assert_eq!(status.code(), Some(0), "round {round}: {status}\n{log}");
    }
}

/// `fieldgate modbus import` turns a vendor's CSV into tags that the configuration takes
/// as they are; a bad list exits 64 naming each line and column.
#[test]
fn modbus_import_turns_a_vendor_csv_into_tags() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("tags.csv");
    std::fs::write(
        &csv,
        "Tag Name;Register;Data Type;Byte Order;Scale Factor;Units;Description\r\n\
         power;40001;FLOAT32;CDAB;0,1;kW;\"total; all phases\"\r\n\
         pump_on;00001;;;;;\r\n\
         temp;30011;int16;big;0,01;degC;\r\n\
         serial;40100;string;;;;\"length set below\"\r\n",
    )
    .unwrap();
    let o = fieldgate(&["modbus", "import", csv.to_str().unwrap()], &[]);
    // The string tag needs a length: the import says so, with its line.
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("line 5"), "{}", text(&o));
    let fixed = std::fs::read_to_string(&csv)
        .unwrap()
        .replace("Description\r\n", "Description;Length\r\n")
        .replace("\"length set below\"", "\"length set below\";8");
    std::fs::write(&csv, fixed).unwrap();
    let o = fieldgate(&["modbus", "import", csv.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let tags = String::from_utf8(o.stdout).unwrap();
    assert_eq!(tags.matches("[[modbus.tags]]").count(), 4, "{tags}");
    for want in [
        // holding_register is the default kind: left out.
        "name = \"power\"",
        "type = \"f32\"",
        "order = \"CDAB\"",
        "scale = 0.1",
        "unit = \"kW\"",
        "kind = \"coil\"",
        "kind = \"input_register\"",
        "address = 10",
        "length = 8",
    ] {
        assert!(tags.contains(want), "{want} missing:\n{tags}");
    }
    // Pasted under a device, the configuration validates.
    let conf = dir.path().join("gw.toml");
    std::fs::write(
        &conf,
        format!(
            "[gateway]\nid = \"imp\"\n[[modbus]]\nname = \"meter\"\nhost = \"127.0.0.1:5020\"\n{tags}"
        ),
    )
    .unwrap();
    let o = fieldgate(&["check-config", "-c", conf.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}\n{tags}", text(&o));
}
