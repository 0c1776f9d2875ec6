//! The Debian package: built by `cross/deb.sh` from the binary under test (or, in CI, the
//! cross-compiled arm64 package named by `FIELDGATE_TEST_DEB`), then taken apart with
//! `dpkg-deb` to check what an installation would put where.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (dpkg-deb comes with every Debian system)"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The package to inspect and the Debian architecture it must carry.
fn package(out: &Path) -> (PathBuf, String) {
    if let Ok(deb) = std::env::var("FIELDGATE_TEST_DEB") {
        let arch = std::env::var("FIELDGATE_TEST_DEB_ARCH").expect("FIELDGATE_TEST_DEB_ARCH");
        return (PathBuf::from(deb), arch);
    }
    let built = run(Command::new(root().join("cross/deb.sh"))
        .args([
            "amd64",
            "--binary",
            env!("CARGO_BIN_EXE_fieldgate"),
            "--out",
        ])
        .arg(out)
        .env("DEB_COMPRESSION", "none"));
    let path = built.split(" (").next().unwrap().trim().to_string();
    (PathBuf::from(path), "amd64".to_string())
}

#[test]
fn deb_contents_unit_config_and_maintainer_scripts() {
    let tmp = tempfile::tempdir().unwrap();
    let (deb, arch) = package(tmp.path());

    let info = run(Command::new("dpkg-deb").arg("--field").arg(&deb));
    for want in [
        "Package: fieldgate".to_string(),
        format!("Version: {}", env!("CARGO_PKG_VERSION")),
        format!("Architecture: {arch}"),
    ] {
        assert!(
            info.lines().any(|l| l == want),
            "missing {want:?} in\n{info}"
        );
    }
    assert!(
        info.contains("Depends:") && info.contains("adduser"),
        "{info}"
    );

    // File list with owners and modes.
    let list = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for (mode, path) in [
        ("-rwxr-xr-x root/root", "./usr/bin/fieldgate"),
        (
            "-rw-r--r-- root/root",
            "./lib/systemd/system/fieldgate.service",
        ),
        ("-rw-r--r-- root/root", "./etc/fieldgate/fieldgate.toml"),
        (
            "-rw-r--r-- root/root",
            "./usr/share/doc/fieldgate/examples/pi-cloud.toml",
        ),
        (
            "-rw-r--r-- root/root",
            "./usr/share/doc/fieldgate/copyright",
        ),
    ] {
        assert!(
            list.lines()
                .any(|l| l.starts_with(mode) && l.ends_with(&format!(" {path}"))),
            "{path} ({mode}) not in\n{list}"
        );
    }

    // Installed files are exactly the repository's unit and config.
    let fs = tmp.path().join("fs");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&fs));
    for (inside, source) in [
        (
            "lib/systemd/system/fieldgate.service",
            "systemd/fieldgate.service",
        ),
        ("etc/fieldgate/fieldgate.toml", "configs/fieldgate.toml"),
    ] {
        assert_eq!(
            std::fs::read(fs.join(inside)).unwrap(),
            std::fs::read(root().join(source)).unwrap(),
            "{inside} differs from {source}"
        );
    }

    // Control files: the config is a conffile (kept on upgrade); the scripts create the user
    // (with serial access), enable the unit, restart on upgrade and are valid sh.
    let ctl = tmp.path().join("ctl");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl));
    let conffiles = std::fs::read_to_string(ctl.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/fieldgate/fieldgate.toml");
    let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
    for want in [
        "adduser --system --group --home /var/lib/fieldgate",
        "adduser --quiet fieldgate dialout",
        "deb-systemd-helper enable fieldgate.service",
        "deb-systemd-invoke restart fieldgate.service",
    ] {
        assert!(
            postinst.contains(want),
            "postinst lacks {want:?}:\n{postinst}"
        );
    }
    let postrm = std::fs::read_to_string(ctl.join("postrm")).unwrap();
    assert!(postrm.contains("rm -rf /var/lib/fieldgate"), "{postrm}");
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(ctl.join(script)));
    }

    // A package for this machine's architecture: its binary runs and accepts its own config.
    if arch == "amd64" && cfg!(target_arch = "x86_64") {
        let bin = fs.join("usr/bin/fieldgate");
        let v = run(Command::new(&bin).arg("--version"));
        assert!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");
        run(Command::new(&bin)
            .args(["check-config", "-c"])
            .arg(fs.join("etc/fieldgate/fieldgate.toml")));
    }
}
