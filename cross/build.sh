#!/usr/bin/env bash
# Cross-compiles fieldgate release images for Raspberry Pi and other ARM Linux boxes on a plain
# Debian/Ubuntu x86_64 machine: no Docker. Debian's cross linkers link, qemu-user-static runs
# the result (tests, smoke runs) on the build machine.
#
#   cross/build.sh [--setup] TARGET...      build target/<triple>/release/fieldgate
#   cross/build.sh --env TARGET             print the runner line for TARGET (used by smoke.sh)
#
# TARGET is one of
#   aarch64       aarch64-unknown-linux-gnu       Pi 3/4/5, Pi OS 64-bit Bookworm+ (glibc >= 2.34)
#   armv7         armv7-unknown-linux-gnueabihf   Pi 2/3/4, Pi OS 32-bit Bookworm+ (glibc >= 2.34)
#   aarch64-musl  aarch64-unknown-linux-musl      static, 64-bit, any glibc (Pi OS Bullseye)
#   amd64         x86_64-unknown-linux-gnu        native build, for the amd64 .deb
#
# --setup installs what the build needs (as root): Debian's cross gcc and libc, qemu-user-static,
# and the Rust std for the targets (rustup). Without it the script only checks and explains.
# If rustup cannot fetch a target's std, --setup falls back to Debian's own Rust (rustc-web,
# cargo-web, rust-web-src) and the build compiles std from source (-Zbuild-std): slower, same
# binary. See ../shared/notes/cross.md in the team repository for how both routes were verified.
# ARMv6 (Pi Zero/Zero W/Pi 1) has no route: rustup ships no std for it here.
set -euo pipefail
cd "$(dirname "$0")/.."

triple() {
  case "$1" in
    aarch64) echo aarch64-unknown-linux-gnu ;;
    armv7) echo armv7-unknown-linux-gnueabihf ;;
    aarch64-musl) echo aarch64-unknown-linux-musl ;;
    amd64) echo x86_64-unknown-linux-gnu ;;
    *) echo "cross/build.sh: unknown target '$1' (use aarch64, armv7, aarch64-musl or amd64)" >&2; exit 64 ;;
  esac
}

# The qemu command prefix that runs a binary of TARGET on this machine (empty for amd64).
# -L and LD_LIBRARY_PATH point the emulated dynamic loader at Debian's cross sysroot.
runner() {
  case "$1" in
    aarch64) echo "qemu-aarch64-static -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib" ;;
    armv7) echo "qemu-arm-static -L /usr/arm-linux-gnueabihf -E LD_LIBRARY_PATH=/usr/arm-linux-gnueabihf/lib" ;;
    aarch64-musl) echo "qemu-aarch64-static" ;;
    amd64) echo "" ;;
  esac
}

linker() {
  case "$1" in
    aarch64 | aarch64-musl) echo aarch64-linux-gnu-gcc ;;
    armv7) echo arm-linux-gnueabihf-gcc ;;
    amd64) echo "" ;;
  esac
}

setup() {
  local pkgs=() t
  for t in "$@"; do
    case "$t" in
      aarch64 | aarch64-musl) pkgs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static) ;;
      armv7) pkgs+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user-static) ;;
    esac
  done
  if [ ${#pkgs[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Never `dpkg --add-architecture armhf`: not needed, and a stale armhf index breaks apt.
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
  for t in "$@"; do
    [ "$t" = amd64 ] && continue
    if ! rustup target add "$(triple "$t")"; then
      echo "cross/build.sh: rustup has no std for $(triple "$t") here; using Debian's Rust with -Zbuild-std" >&2
      local v
      v=$(apt-cache policy rustc-web | awk '/Candidate:/{print $2}')
      apt-get install -y -qq --no-install-recommends "rustc-web=$v" "cargo-web=$v" "rust-web-src=$v" >/dev/null
    fi
  done
}

# How to build TARGET: rustup's std if installed, else Debian's Rust building std from source.
cargo_for() {
  local tr
  tr=$(triple "$1")
  if [ "$1" = amd64 ] || rustup target list --installed 2>/dev/null | grep -qx "$tr"; then
    echo cargo
  elif [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ]; then
    echo "env RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 /usr/bin/cargo -Zbuild-std=std,panic_unwind,panic_abort"
  else
    echo "cross/build.sh: no Rust std for $tr; run 'cross/build.sh --setup $1' (as root) first" >&2
    exit 69
  fi
}

if [ "${1:-}" = "--env" ]; then
  t="${2:?usage: cross/build.sh --env TARGET}"
  triple "$t" >/dev/null
  echo "FIELDGATE_TEST_BIN=target/$(triple "$t")/release/fieldgate"
  echo "FIELDGATE_TEST_RUNNER=$(runner "$t")"
  exit 0
fi

do_setup=0
if [ "${1:-}" = "--setup" ]; then
  do_setup=1
  shift
fi
[ $# -gt 0 ] || { sed -n '2,21p' "$0"; exit 64; }
for t in "$@"; do triple "$t" >/dev/null; done
[ $do_setup = 1 ] && setup "$@"

for t in "$@"; do
  tr=$(triple "$t")
  ld=$(linker "$t")
  if [ -n "$ld" ] && ! command -v "$ld" >/dev/null; then
    echo "cross/build.sh: $ld not found; run 'cross/build.sh --setup $t' (as root) first" >&2
    exit 69
  fi
  var=$(echo "$tr" | tr 'a-z-' 'A-Z_')
  start=$SECONDS
  build_cargo=$(cargo_for "$t")
  (
    if [ -n "$ld" ]; then
      export "CARGO_TARGET_${var}_LINKER=$ld"
      export "CARGO_TARGET_${var}_RUNNER=$(runner "$t")"
      # ring's C and assembly: cc-rs finds the gnu cross gcc itself, not for musl.
      export "CC_$(echo "$tr" | tr '-' '_')=$ld"
    fi
    $build_cargo build --locked --release --target "$tr" --bin fieldgate
  )
  bin="target/$tr/release/fieldgate"
  printf '%s: %s (%s bytes, %ss)\n' "$t" "$bin" "$(stat -c %s "$bin")" "$((SECONDS - start))"
done
