#!/bin/bash
# Cross-build edgegate .deb packages for Raspberry Pi-class devices on a Debian 12 amd64 machine.
#
#   packaging/build-debs.sh                 # arm64 and armhf
#   packaging/build-debs.sh arm64           # one architecture (arm64 | armhf | amd64)
#
# Needs: Debian's cross compilers (installed here with apt-get when run as root), rustup targets
# (added here), cargo-deb (installed from crates.io when missing). Respects CARGO_TARGET_DIR.
# Prints one line per package: ARCH PATH-TO-DEB STRIPPED-BINARY-BYTES, and fails if the arm64
# binary exceeds the 6 MB budget (after building every package).
set -euo pipefail

cd "$(dirname "$0")/.."
ARCHES=("$@")
[ ${#ARCHES[@]} -gt 0 ] || ARCHES=(arm64 armhf)
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
ARM64_BUDGET=$((6 * 1000 * 1000))

log() { echo "build-debs: $*" >&2; }

need_apt=()
for arch in "${ARCHES[@]}"; do
    case $arch in
        arm64) command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
        armhf) command -v arm-linux-gnueabihf-gcc >/dev/null || need_apt+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
        amd64) ;;
        *) echo "build-debs: unknown architecture '$arch' (arm64, armhf, amd64)" >&2; exit 64 ;;
    esac
done
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        log "missing cross compilers; run as root or: apt-get install ${need_apt[*]}"
        exit 69
    fi
    log "installing ${need_apt[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >&2
fi
if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb from crates.io"
    cargo install --locked cargo-deb >&2
fi

for arch in "${ARCHES[@]}"; do
    case $arch in
        arm64)
            triple=aarch64-unknown-linux-gnu
            export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
            export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
            export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
            ;;
        armhf)
            # ARMv7 + hard float: Raspberry Pi 2 and later on 32-bit Raspberry Pi OS / Debian armhf.
            triple=armv7-unknown-linux-gnueabihf
            export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
            export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
            export AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar
            ;;
        amd64) triple=x86_64-unknown-linux-gnu ;;
    esac
    if ! rustup target list --installed | grep -qx "$triple"; then
        log "rustup target add $triple"
        rustup target add "$triple" >&2
    fi
    log "building $arch ($triple)"
    # The release profile already strips; --no-strip avoids needing a cross `strip`.
    deb=$(cargo deb --target "$triple" --no-strip | tail -n 1)
    bin="$TARGET_DIR/$triple/release/edgegate"
    size=$(stat -c %s "$bin")
    echo "$arch $deb $size"
    if [ "$arch" = arm64 ] && [ "$size" -gt "$ARM64_BUDGET" ]; then
        log "arm64 binary is $size bytes, over the budget of $ARM64_BUDGET"
        over_budget=1
    fi
done
# Every package is built first; the size budget fails the run at the end.
exit "${over_budget:-0}"
