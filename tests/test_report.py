"""qevm report: the HTML page of real streams, driven in a real headless Chromium (selenium).

The page must load offline with no console errors, its section table must sort, each RAM block's
canvas must be painted, and a typed search must find a decoded field (a virtio queue index, the
virtio-net MAC) with the path ``qevm edit`` takes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_fixture
from test_cli import qevm

from qevm.analysis.report import collect

CHROME = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROME and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium / chromedriver missing in CI (scripts/test.sh installs them)")
        pytest.skip("chromium and chromium-driver not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("selenium missing in CI")
        pytest.skip("selenium not installed")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROME
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def _open(browser: Any, page: Path) -> list[dict[str, Any]]:
    browser.get(page.as_uri())
    browser.find_element("id", "search")
    return [e for e in browser.get_log("browser") if e.get("level") in ("SEVERE", "WARNING")]


def test_single_report_in_chromium(browser: Any, tmp_path: Path) -> None:
    f = require_fixture("virtio-q35-7.2")
    page = tmp_path / "report.html"
    r = qevm("report", str(f), "-o", str(page))
    assert "wrote" in r.stderr.decode()
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "the page must not load anything"
    assert len(text.encode()) < 5 << 20
    assert _open(browser, page) == []
    # sections table sorts by size (descending after two clicks)
    th = browser.find_elements("css selector", "#sectable-0 thead th")
    size_col = next(i for i, t in enumerate(th) if t.text.startswith("bytes"))
    th[size_col].click()
    th[size_col].click()
    sizes = [int(td.get_attribute("data-v")) for td in
             browser.find_elements("css selector", f"#sectable-0 tbody td:nth-child({size_col + 1})")]
    assert sizes == sorted(sizes, reverse=True) and len(sizes) > 20
    first = browser.find_element("css selector", "#sectable-0 tbody tr td:nth-child(2)").text
    assert first == "ram"
    # every RAM block has a painted canvas; pc.ram has both sent and never-sent cells
    painted = browser.execute_script("""
        return Array.from(document.querySelectorAll('canvas[data-block]')).map(cv => {
          const d = cv.getContext('2d').getImageData(0, 0, cv.width, cv.height).data;
          let colored = 0; for (let i = 0; i < d.length; i += 4) if (d[i+3] && (d[i] < 250 || d[i+1] < 250)) colored++;
          return [cv.dataset.block, cv.width, cv.height, colored];
        });""")
    assert painted and all(w > 0 and h > 0 and n > 0 for _, w, h, n in painted), painted
    browser.find_element("css selector", "input[name=rammode][value=kind]").click()
    assert not [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    # a driven search finds decoded blob fields and hides the rest
    box = browser.find_element("id", "search")
    box.send_keys("device/mac")
    browser.implicitly_wait(0)
    import time

    deadline = time.time() + 5
    while time.time() < deadline and "match" not in browser.find_element("id", "searchinfo").text:
        time.sleep(0.1)
    rows = [r for r in browser.find_elements("css selector", "details.dev tbody tr") if r.is_displayed()]
    assert rows, browser.find_element("id", "searchinfo").text
    cells = rows[0].find_elements("css selector", "td")
    assert cells[0].text.endswith("/virtio/device/mac") and cells[2].text == "525400123470"
    assert cells[0].text.startswith('"0000:')
    box.clear()
    box.send_keys("last_avail_idx")
    deadline = time.time() + 5
    while time.time() < deadline and "last_avail_idx" not in " ".join(
            r.text for r in browser.find_elements("css selector", "details.dev tbody tr") if r.is_displayed()):
        time.sleep(0.1)
    shown = [r.text for r in browser.find_elements("css selector", "details.dev tbody tr") if r.is_displayed()]
    assert shown and all("last_avail_idx" in s for s in shown)


def _diff_doc(page: Path) -> dict[str, Any]:
    m = re.search(r'<script type="application/json" id="qevm-data">(.*?)</script>', page.read_text(), re.S)
    assert m
    return json.loads(m.group(1).replace("<\\/", "</"))["diff"]


def _same_as_qevm_diff(page: Path, a: Path, b: Path) -> dict[str, Any]:
    """The page's differences are ``qevm diff --json``'s, nothing else (one comparison in the project)."""
    mine = _diff_doc(page)
    r = qevm("diff", "--json", str(a), str(b), check=False)
    assert r.returncode in (0, 1), r.stderr.decode()
    theirs = json.loads(r.stdout)
    for sec in mine["sections"]:
        assert sec.pop("fields_total") == len(sec["fields"])
    for blk in (mine["ram"] or {}).get("blocks", []):
        assert blk.pop("ranges_total") == len(blk["ranges"])
    mine.pop("fields_total")
    assert mine == theirs
    return theirs


def _rows(browser: Any, css: str) -> list[list[str]]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).filter(r => r.offsetParent !== null)"
        ".map(r => Array.from(r.cells).map(c => c.textContent));", css)


def test_two_state_report_of_an_edit_in_chromium(browser: Any, tmp_path: Path) -> None:
    """A stream and its ``qevm edit`` (virtio-net MAC, a virtio-scsi queue's last_avail_idx inside the
    decoded virtio blob): the differences view lists exactly the edited paths, A and B side by side."""
    f = require_fixture("virtio-pc-7.2")
    doc = collect(str(f), pages=False)
    net = next(d for d in doc["devices"] if d["section"].endswith("/virtio-net"))
    scsi = next(d for d in doc["devices"] if d["section"].endswith("/virtio-scsi"))
    idx = next(r for r in scsi["rows"] if r[0].endswith("/last_avail_idx") and r[2] != "0")
    mac = f"{net['path']}/virtio/device/mac"
    out = tmp_path / "e.mig"
    qevm("edit", str(f), str(out), "--set", f"{mac}=5254009abcde", "--set", f"{idx[0]}=300")
    page = tmp_path / "edit.html"
    r = qevm("report", str(f), str(out), "-o", str(page))
    assert "2 changed fields" in r.stderr.decode()
    _same_as_qevm_diff(page, f, out)
    assert _open(browser, page) == []
    assert browser.find_element("id", "diff").is_displayed()
    rows = _rows(browser, "table.difffields tbody tr")
    old = idx[2].split()[0]
    assert sorted(rows) == sorted([[mac, "buffer", "bytes [0x3, 0x6)", "525400123470", "5254009abcde"],
                                   [idx[0], "uint16", "value", old, "300"]])
    assert not _rows(browser, "table.diffconfig tbody tr") and not _rows(browser, "table.diffram tbody tr")
    assert "RAM pages that differ (none" in browser.find_element("id", "diffbody").text
    # the filter box narrows the differences to the typed path
    browser.find_element("id", "diffsearch").send_keys("device/mac")
    assert [x[0] for x in _rows(browser, "table.difffields tbody tr")] == [mac]


def test_two_state_report_in_chromium(browser: Any, tmp_path: Path) -> None:
    """QEMU 7.2 vs 10.0, same machine family and devices: configuration, sections on one side, decoded
    PCI/virtio fields, subsections on one side and RAM page ranges, as ``qevm diff`` finds them."""
    a, b = require_fixture("virtio-q35-7.2"), require_fixture("virtio-q35-10.0")
    page = tmp_path / "diff.html"
    qevm("report", str(a), str(b), "-o", str(page))
    theirs = _same_as_qevm_diff(page, a, b)
    assert _open(browser, page) == []
    assert browser.find_element("id", "diff").is_displayed()
    assert ["machine", "pc-q35-7.2", "pc-q35-10.0"] in _rows(browser, "table.diffconfig tbody tr")
    assert ["parallel_isa:0", "version 1", "(absent)"] in _rows(browser, "table.diffsections tbody tr")
    fields = _rows(browser, "table.difffields tbody tr")
    assert len(fields) == sum(len(s["fields"]) for s in theirs["sections"])
    assert any(p.endswith("/virtio/transport/config/pcie@0x40/devcap") and t == "uint32_le" for p, t, *_ in fields)
    assert any(p.endswith("/virtio/vq[0]/num") for p, *_ in fields)
    subs = _rows(browser, "table.diffsubs tbody tr")
    assert any(p.endswith("/virtio/virtio/ringsize") and x == ["(absent)", "sent"] for p, *x in subs), subs
    ram = {r[0]: r for r in _rows(browser, "table.diffram tbody tr")}
    pc = next(x for x in theirs["ram"]["blocks"] if x["block"] == "pc.ram")
    assert ram["pc.ram"][3:] == [f"{pc[k]:,}" for k in ("pages_changed", "pages_appeared", "pages_disappeared")]
    ranges = _rows(browser, "table.diffranges tbody tr")
    assert any(r[0] == "pc.ram" and r[3] for r in ranges)  # guest-physical addresses for pc.ram


def test_report_errors(tmp_path: Path) -> None:
    f = require_fixture("virtio-pc-7.2")
    r = qevm("report", str(f), str(f), str(f), "-o", str(tmp_path / "x.html"), check=False)
    assert r.returncode == 2 and "two" in r.stderr.decode()
    r = qevm("report", str(f), "-o", str(tmp_path / "nodir" / "x.html"), check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr.decode()
    bad = tmp_path / "bad.mig"
    bad.write_bytes(f.read_bytes()[:5000])
    r = qevm("report", str(bad), "-o", str(tmp_path / "y.html"), check=False)
    assert r.returncode == 2 and not (tmp_path / "y.html").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qevm-")]


def test_two_state_report_of_xbzrle_streams(tmp_path: Path) -> None:
    """A side with XBZRLE pages is read a second time (its page digests need the previous content):
    the report's RAM map comes from the pass that counts, and the differences are still qevm diff's."""
    from qevm.analysis.report import _gather

    f = require_fixture("xbzrle-7.2")
    doc, _, table = _gather(str(f), True, None, True, {})
    assert table is not None and doc["ram"] == collect(str(f), pages=True)["ram"]
    page = tmp_path / "x.html"
    r = qevm("report", str(f), str(f), "-o", str(page))
    assert "0 changed fields" in r.stderr.decode()
    mine = _diff_doc(page)
    assert mine["equal"] and mine["ram"] == {"page_size": 4096, "blocks": []}


def test_two_state_report_reads_the_sides_as_qevm_diff_does(tmp_path: Path) -> None:
    """Without the per-record map, ``qevm report A B`` reads the sides in ``qevm diff``'s order with its
    page tables (a plain file located, a compressed side compared with it as it passes): the same
    differences as ``qevm diff`` (a data page zeroed, a zero page given data, a changed page), either way."""
    import gzip

    from qevm.analysis import report
    from qevm.analysis.diff import PageLocations, PageVerdicts, diff_states

    a = require_fixture("diff-run-7.2")
    b = a.with_name("diff-run-7.2.b.mig")
    gz = tmp_path / "a.mig.gz"
    gz.write_bytes(gzip.compress(a.read_bytes(), compresslevel=1))
    seen: list[type] = []
    gather = report._gather

    def spy(*args: Any, **kw: Any) -> Any:
        out = gather(*args, **kw)
        seen.append(type(out[2]))
        return out

    report._gather = spy  # type: ignore[assignment]
    try:
        for x, y in ((a, b), (gz, b), (b, gz)):
            seen.clear()
            page = tmp_path / "p.html"
            report.write_report([str(x), str(y)], str(page), pages=False)
            mine = _diff_doc(page)
            for sec in mine["sections"]:
                sec.pop("fields_total")
            for blk in mine["ram"]["blocks"]:
                blk.pop("ranges_total")
            mine.pop("fields_total")
            assert mine == diff_states(str(x), str(y)).as_json()
            assert not mine["equal"] and mine["ram"]["blocks"]
            # the plain file is read first and the other side compared with it (no digests)
            assert seen == ([PageLocations, PageLocations] if x == a else [PageLocations, PageVerdicts])
    finally:
        report._gather = gather  # type: ignore[assignment]
