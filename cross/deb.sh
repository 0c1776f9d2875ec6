#!/usr/bin/env bash
# Builds the Debian package of fieldgate from a release binary, with Debian's own dpkg-deb
# (nothing to install). One package per architecture: arm64, armhf, amd64.
#
#   cross/build.sh aarch64 && cross/deb.sh aarch64          -> target/deb/fieldgate_<v>_arm64.deb
#   cross/deb.sh amd64 --binary target/release/fieldgate --out /tmp/x
#
# What the package does (see the maintainer scripts below):
# - /usr/bin/fieldgate, the unit /lib/systemd/system/fieldgate.service, the default config
#   /etc/fieldgate/fieldgate.toml as a conffile (an edited config is kept on upgrade), the
#   example configs under /usr/share/doc/fieldgate/examples;
# - postinst creates the system user and group `fieldgate` (in `dialout`, for serial ports),
#   enables the service on first install and starts it, or restarts it on upgrade: SIGTERM, the
#   queue is committed, the new binary opens the same queue in /var/lib/fieldgate;
# - remove stops the service and keeps the queue; purge deletes /var/lib/fieldgate (the queue).
set -euo pipefail
cd "$(dirname "$0")/.."

t="${1:?usage: cross/deb.sh aarch64|armv7|aarch64-musl|amd64 [--binary PATH] [--out DIR]}"
shift
case "$t" in
  aarch64) arch=arm64; tr=aarch64-unknown-linux-gnu ;;
  aarch64-musl) arch=arm64; tr=aarch64-unknown-linux-musl ;;
  armv7) arch=armhf; tr=armv7-unknown-linux-gnueabihf ;;
  amd64) arch=amd64; tr=x86_64-unknown-linux-gnu ;;
  *) echo "cross/deb.sh: unknown target '$t'" >&2; exit 64 ;;
esac
bin="target/$tr/release/fieldgate"
[ "$t" = amd64 ] && [ ! -x "$bin" ] && bin=target/release/fieldgate
out=target/deb
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) bin="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "cross/deb.sh: unknown option $1" >&2; exit 64 ;;
  esac
done
[ -x "$bin" ] || { echo "cross/deb.sh: no binary at $bin; run cross/build.sh $t first" >&2; exit 66; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# musl builds are static: no libc dependency.
depends="adduser"
[ "$t" = aarch64-musl ] || depends="libc6 (>= 2.34), adduser"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"
install -D -m 0755 "$bin" "$root/usr/bin/fieldgate"
install -D -m 0644 systemd/fieldgate.service "$root/lib/systemd/system/fieldgate.service"
install -D -m 0644 configs/fieldgate.toml "$root/etc/fieldgate/fieldgate.toml"
install -d -m 0755 "$root/usr/share/doc/fieldgate/examples"
install -m 0644 configs/*.toml "$root/usr/share/doc/fieldgate/examples/"
install -m 0644 README.md "$root/usr/share/doc/fieldgate/README.md"
for d in docs/*.md; do
  [ -e "$d" ] && install -m 0644 "$d" "$root/usr/share/doc/fieldgate/"
done
cat > "$root/usr/share/doc/fieldgate/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fieldgate
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF

install -d -m 0755 "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: fieldgate
Version: $version
Architecture: $arch
Maintainer: fieldgate maintainers <fieldgate@example.invalid>
Installed-Size: $size
Depends: $depends
Section: net
Priority: optional
Description: edge gateway that never loses a reading
 One service for an industrial or IoT edge box: an embedded MQTT broker for
 local devices, Modbus and serial-line sources, a crash-proof store-and-forward
 queue on disk, and a mutual-TLS bridge to a cloud MQTT broker.
EOF
echo /etc/fieldgate/fieldgate.toml > "$root/DEBIAN/conffiles"

cat > "$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd fieldgate >/dev/null; then
        adduser --system --group --home /var/lib/fieldgate --no-create-home \
            --shell /usr/sbin/nologin --quiet fieldgate
    fi
    # Serial ports (Modbus RTU, serial-line devices) belong to group dialout.
    if getent group dialout >/dev/null; then
        adduser --quiet fieldgate dialout
    fi
    # Certificates under /etc/fieldgate/tls must be readable by the service, not by others.
    chown root:fieldgate /etc/fieldgate
    chmod 0750 /etc/fieldgate
fi
if [ "$1" = configure ] || [ "$1" = abort-upgrade ]; then
    if command -v deb-systemd-helper >/dev/null; then
        deb-systemd-helper unmask fieldgate.service >/dev/null || true
        # was-enabled is true on a first install (so the service gets enabled) and keeps an
        # administrator's `systemctl disable` on upgrades.
        if deb-systemd-helper --quiet was-enabled fieldgate.service; then
            deb-systemd-helper enable fieldgate.service >/dev/null || true
        else
            deb-systemd-helper update-state fieldgate.service >/dev/null || true
        fi
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        if [ -n "$2" ]; then
            # Upgrade: an orderly restart commits the queue; the new binary reopens it.
            deb-systemd-invoke restart fieldgate.service >/dev/null || true
        else
            deb-systemd-invoke start fieldgate.service >/dev/null || true
        fi
    fi
fi
exit 0
EOF

cat > "$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
# Upgrades restart in postinst; only a removal stops the service here.
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    deb-systemd-invoke stop fieldgate.service >/dev/null || true
fi
exit 0
EOF

cat > "$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = remove ] && command -v deb-systemd-helper >/dev/null; then
    deb-systemd-helper mask fieldgate.service >/dev/null || true
fi
if [ "$1" = purge ]; then
    if command -v deb-systemd-helper >/dev/null; then
        deb-systemd-helper purge fieldgate.service >/dev/null || true
        deb-systemd-helper unmask fieldgate.service >/dev/null || true
    fi
    # Purge deletes the queue: messages not yet delivered are gone. Remove keeps it.
    rm -rf /var/lib/fieldgate
fi
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/fieldgate_${version}_${arch}.deb"
# DEB_COMPRESSION=none makes test builds of big debug binaries quick.
dpkg-deb --root-owner-group "-Z${DEB_COMPRESSION:-xz}" --build "$root" "$deb" >/dev/null
printf '%s (%s bytes)\n' "$deb" "$(stat -c %s "$deb")"
