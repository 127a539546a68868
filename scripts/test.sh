#!/usr/bin/env bash
# Install everything the tests need, build the real-QEMU fixtures (cached), run the tests.
#   QEMU 7.2 from Debian, QEMU 10.0 in a Debian trixie chroot, QEMU's own analyze-migration.py
#   (from Debian's source packages, for comparison), a Linux guest, then pytest and ruff.
# Heavy artifacts are cached under ${QEVM_CACHE:-~/.cache/qevm} and rebuilt only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export QEVM_CACHE="${QEVM_CACHE:-$HOME/.cache/qevm}"
export QEVM_FIXTURES="${QEVM_FIXTURES:-$QEVM_CACHE/fixtures}"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

pkgs=(qemu-system-x86 qemu-system-arm qemu-system-ppc qemu-system-misc qemu-utils debootstrap cpio xz-utils gzip bzip2 zstd
      chromium chromium-driver)  # chromium: tests/test_report.py drives the HTML report in a real browser
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "== python packages"
python3 -m pip install -q -e '.[test,fleet]'  # fleet: dask.distributed and pyarrow (tests/test_scan.py)

echo "== QEMU 10.0 chroot"
bash scripts/chroot.sh >/dev/null
echo "== analyze-migration.py from Debian's qemu sources"
bash scripts/fetch-peer.sh >/dev/null
echo "== fixtures (real QEMU streams) in $QEVM_FIXTURES"
start=$(date +%s)
python3 scripts/fixtures/make.py
echo "   fixtures ready in $(( $(date +%s) - start )) s"

echo "== ruff"
python3 -m ruff check $(ls -d src tests scripts benchmarks 2>/dev/null)
echo "== import-linter (layers contract in pyproject.toml)"
PYTHONPATH=src lint-imports --no-cache
echo "== mypy"
MYPYPATH=src python3 -m mypy --strict -p qevm
echo "== pytest"
python3 -m pytest -q "$@"
