"""qevm report: the HTML page of real streams, driven in a real headless Chromium (selenium).

The page must load offline with no console errors, its section table must sort, each RAM block's
canvas must be painted, and a typed search must find a decoded field (a virtio queue index, the
virtio-net MAC) with the path ``qevm edit`` takes.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_fixture
from test_cli import qevm

from qevm.analysis.report import collect, compare

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


def test_two_state_report_in_chromium(browser: Any, tmp_path: Path) -> None:
    a, b = require_fixture("virtio-q35-7.2"), require_fixture("virtio-q35-10.0")
    page = tmp_path / "diff.html"
    qevm("report", str(a), str(b), "-o", str(page))
    assert _open(browser, page) == []
    assert browser.find_element("id", "diff").is_displayed()
    texts = browser.execute_script(
        "return Array.from(document.querySelectorAll('table.difffields tbody tr')).map(r => r.textContent);")
    assert len(texts) > 10
    # QEMU 10.0 sends SWITCHOVER_START and other section versions: some virtio queue state differs
    assert any("/virtio/" in t for t in texts), texts[:20]


def test_compare_finds_an_edit(tmp_path: Path) -> None:
    """The two-state comparison reports exactly the fields an edit changed."""
    f = require_fixture("virtio-pc-7.2")
    doc = collect(str(f), pages=False)
    net = next(d for d in doc["devices"] if d["section"].endswith("/virtio-net"))
    out = tmp_path / "e.mig"
    qevm("edit", str(f), str(out), "--set", f"{net['path']}/virtio/device/mac=5254009abcde")
    diff = compare(doc, collect(str(out), pages=False))
    assert diff["fields"] == [[f"{net['path']}/virtio/device/mac", "525400123470", "5254009abcde"]]


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
