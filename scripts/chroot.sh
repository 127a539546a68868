#!/usr/bin/env bash
# Debian trixie chroot with QEMU 10.0, used to make QEMU 10.0 fixtures.
#
# Usage: scripts/chroot.sh [build|path|check|mount|umount|run CMD...]
#   build   (default) build ${QEVM_CACHE:-~/.cache/qevm}/trixie if missing,
#           print its path.  Idempotent and atomic: it is built in
#           trixie.tmp, checked, marked complete, then renamed into place.
#   path    print the chroot path (exit 1 if it is not built).
#   check   print the chroot's qemu-system-x86_64 --version.
#   mount   bind-mount /proc into the chroot (idempotent).  Not needed
#           for the fixtures: QEMU (TCG, -nodefaults, QMP on a unix socket,
#           serial to a file) runs with only the /dev nodes debootstrap
#           creates.  Provided for ad-hoc debugging (ps, gdb...).
#   umount  undo `mount` and any mount left under the chroot (idempotent).
#   run     run CMD inside the chroot (chroot DIR CMD...).
#
# Needs root.  Environment: QEVM_CACHE, QEVM_MIRROR (default
# http://deb.debian.org/debian), QEVM_SUITE (default trixie).
set -euo pipefail

CACHE=${QEVM_CACHE:-$HOME/.cache/qevm}
SUITE=${QEVM_SUITE:-trixie}
MIRROR=${QEVM_MIRROR:-http://deb.debian.org/debian}
DIR=$CACHE/$SUITE
MARK=$DIR/.qevm-chroot-complete
PKGS=qemu-system-x86,qemu-utils

log() { printf 'chroot.sh: %s\n' "$*" >&2; }

# Every mount point at or below $1, deepest first.
mounts_under() {
    local root
    root=$(readlink -f "$1" 2>/dev/null) || return 0
    awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts |
        sed 's/\\040/ /g' | sort -r
}

umount_all() {
    local m
    mounts_under "$1" | while IFS= read -r m; do
        [ -n "$m" ] || continue
        umount "$m" 2>/dev/null || umount -l "$m"
    done
}

need_root() {
    [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
}

build() {
    if [ -f "$MARK" ]; then
        echo "$DIR"
        return 0
    fi
    need_root
    mkdir -p "$CACHE"
    # Serialise concurrent builders.
    exec 9>"$CACHE/.$SUITE.lock"
    flock 9
    if [ -f "$MARK" ]; then
        echo "$DIR"
        return 0
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
    fi
    local tmp=$DIR.tmp
    if [ -e "$tmp" ]; then
        log "removing stale $tmp"
        umount_all "$tmp"
        rm -rf --one-file-system "$tmp"
    fi
    if [ -e "$DIR" ]; then
        # Present but unmarked: an interrupted or foreign tree.
        log "removing incomplete $DIR"
        umount_all "$DIR"
        rm -rf --one-file-system "$DIR"
    fi
    local t0=$SECONDS
    log "debootstrap $SUITE into $tmp (a few minutes)"
    if ! debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$tmp" "$MIRROR" \
            >"$CACHE/.$SUITE.debootstrap.log" 2>&1; then
        umount_all "$tmp"
        log "debootstrap failed; see $CACHE/.$SUITE.debootstrap.log"
        tail -n 20 "$CACHE/.$SUITE.debootstrap.log" >&2
        exit 1
    fi
    umount_all "$tmp"
    chroot "$tmp" apt-get clean >/dev/null 2>&1 || true
    local ver
    ver=$(chroot "$tmp" qemu-system-x86_64 --version | head -n 1)
    log "$ver"
    case $ver in
        *"version 10.0."*) ;;
        *) log "unexpected QEMU version in $SUITE: $ver"; exit 1 ;;
    esac
    printf '%s\nbuilt %s in %ss\n' "$ver" "$(date -u +%FT%TZ)" "$((SECONDS - t0))" >"$tmp/.qevm-chroot-complete"
    mv -T "$tmp" "$DIR"
    log "built $DIR in $((SECONDS - t0))s"
    echo "$DIR"
}

require_built() {
    [ -f "$MARK" ] || { log "$DIR is not built; run scripts/chroot.sh build"; exit 1; }
}

cmd=${1:-build}
[ $# -gt 0 ] && shift
case $cmd in
    build) build ;;
    path) require_built; echo "$DIR" ;;
    check) require_built; chroot "$DIR" qemu-system-x86_64 --version | head -n 1 ;;
    mount)
        need_root; require_built
        mountpoint -q "$DIR/proc" || mount -t proc proc "$DIR/proc"
        ;;
    umount)
        need_root
        [ -d "$DIR" ] && umount_all "$DIR"
        [ -d "$DIR.tmp" ] && umount_all "$DIR.tmp"
        true
        ;;
    run) need_root; require_built; exec chroot "$DIR" "$@" ;;
    -h|--help|help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) log "unknown command: $cmd"; exit 2 ;;
esac
