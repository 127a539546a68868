#!/usr/bin/env bash
# Fetch QEMU's own scripts/analyze-migration.py (the "peer" parser) from
# Debian's qemu source packages, with Debian's patches applied:
#   7.2  from bookworm -> ${QEVM_CACHE:-~/.cache/qevm}/peer/7.2/
#   10.0 from trixie   -> ${QEVM_CACHE:-~/.cache/qevm}/peer/10.0/
# Each directory gets analyze-migration.py, vmstate-static-checker.py and
# SOURCE (package version, applied patches).  Nothing is committed.
#
# Usage: scripts/fetch-peer.sh [7.2] [10.0]      (default: both)
# Idempotent: a version whose analyze-migration.py exists is skipped.
# The host's apt configuration is left alone: a private sources list,
# lists dir and cache live under $CACHE/peer/.apt-SUITE; the downloaded
# source tarballs are deleted afterwards (QEVM_PEER_KEEP=1 keeps them).
set -euo pipefail

CACHE=${QEVM_CACHE:-$HOME/.cache/qevm}
MIRROR=${QEVM_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
FILES=(scripts/analyze-migration.py scripts/vmstate-static-checker.py)

log() { printf 'fetch-peer.sh: %s\n' "$*" >&2; }

suite_for() {
    case $1 in
        7.2) echo bookworm ;;
        10.0) echo trixie ;;
        *) log "unknown QEMU version $1 (want 7.2 or 10.0)"; exit 2 ;;
    esac
}

fetch() {
    local ver=$1 suite out apt work t0=$SECONDS
    suite=$(suite_for "$ver")
    out=$CACHE/peer/$ver
    if [ -s "$out/analyze-migration.py" ]; then
        log "$ver: present ($out/analyze-migration.py)"
        return 0
    fi
    command -v patch >/dev/null || { log "need patch(1): apt-get install patch"; exit 1; }
    apt=$CACHE/peer/.apt-$suite
    mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/parts" "$apt/prefs"
    printf 'deb-src [signed-by=%s] %s %s main\n' "$KEYRING" "$MIRROR" "$suite" >"$apt/sources.list"
    local -a opts=(
        -o "Dir::Etc::SourceList=$apt/sources.list"
        -o "Dir::Etc::SourceParts=$apt/parts"
        -o "Dir::Etc::Preferences=$apt/prefs/none"
        -o "Dir::Etc::PreferencesParts=$apt/prefs"
        -o "Dir::State::Lists=$apt/lists"
        -o "Dir::Cache=$apt"
        -o "Dir::Cache::archives=$apt/archives"
        -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none"
        -o "Debug::NoLocking=1"
    )
    log "$ver: apt-get update ($suite deb-src, private lists)"
    apt-get "${opts[@]}" -qq update
    work=$(mktemp -d "$CACHE/peer/.work-$ver.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    log "$ver: apt-get source --download-only qemu ($suite)"
    (cd "$work" && apt-get "${opts[@]}" -q source --download-only qemu >&2)
    local dsc orig deb
    dsc=$(ls "$work"/qemu_*.dsc)
    orig=$(ls "$work"/qemu_*.orig.tar.* | grep -v '\.orig-' | grep -v '\.asc$' | head -n 1)
    deb=$(ls "$work"/qemu_*.debian.tar.* | head -n 1)
    log "$ver: downloaded $(du -ch "$work"/qemu_* | tail -n 1 | cut -f1) in $((SECONDS - t0))s: $(basename "$dsc")"
    mkdir -p "$work/src"
    tar -xf "$orig" -C "$work/src" --wildcards --no-anchored --strip-components=1 "${FILES[@]}"
    tar -xf "$deb" -C "$work/src" debian/patches
    local applied=() p
    if [ -f "$work/src/debian/patches/series" ]; then
        while IFS= read -r p; do
            p=${p%%#*}; p=${p%% *}
            [ -n "$p" ] || continue
            if grep -qE '^\+\+\+ [^ ]*/?scripts/(analyze-migration|vmstate-static-checker)\.py' \
                    "$work/src/debian/patches/$p"; then
                log "$ver: applying debian/patches/$p"
                # Only the hunks for our files apply; others are missing.
                (cd "$work/src" && filterdiff_apply "debian/patches/$p")
                applied+=("$p")
            fi
        done <"$work/src/debian/patches/series"
    fi
    mkdir -p "$out.tmp"
    local f
    for f in "${FILES[@]}"; do
        cp "$work/src/$f" "$out.tmp/"
    done
    {
        echo "package: $(basename "$dsc" .dsc) ($suite)"
        echo "debian patches applied: ${applied[*]:-none}"
        echo "fetched: $(date -u +%FT%TZ)"
    } >"$out.tmp/SOURCE"
    rm -rf "$out"
    mv -T "$out.tmp" "$out"
    if [ "${QEVM_PEER_KEEP:-0}" = 1 ]; then
        mkdir -p "$CACHE/peer/src-$ver" && cp "$work"/qemu_* "$CACHE/peer/src-$ver/"
    fi
    rm -rf "$apt"  # the private lists (~20 MB); recreated when needed
    log "$ver: wrote $out/analyze-migration.py ($((SECONDS - t0))s)"
}

# Apply only the parts of a patch that touch FILES (others are not extracted).
filterdiff_apply() {
    python3 - "$1" <<'EOF' | patch -p1 --no-backup-if-mismatch -s
import re, sys
want = ("scripts/analyze-migration.py", "scripts/vmstate-static-checker.py")
keep, out = False, []
for line in open(sys.argv[1], encoding="utf-8", errors="surrogateescape"):
    if line.startswith("diff ") or line.startswith("--- "):
        if line.startswith("diff "):
            keep = any(w in line for w in want)
        elif not out or not out[-1].startswith("diff "):
            keep = any(w in line for w in want)
    if keep:
        out.append(line)
sys.stdout.write("".join(out))
EOF
}

vers=("$@")
[ ${#vers[@]} -gt 0 ] || vers=(7.2 10.0)
mkdir -p "$CACHE/peer"
for v in "${vers[@]}"; do
    fetch "$v"
done
