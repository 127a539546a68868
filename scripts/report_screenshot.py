"""Screenshots of a ``qevm report`` page in headless Chromium (for docs/): the overview and a search.

Usage: python3 scripts/report_screenshot.py REPORT.html OUT_PREFIX [SEARCH]
Writes OUT_PREFIX-overview.png (summary, sections), OUT_PREFIX-ram.png (the RAM map) and, with SEARCH,
OUT_PREFIX-search.png (the device tree filtered by SEARCH); a report of two states also gets
OUT_PREFIX-diff.png (the differences view).  Needs chromium, chromium-driver and selenium.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def main(page: str, prefix: str, search: str | None = None) -> int:
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1500,1900"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        drv.get(Path(page).resolve().as_uri())
        time.sleep(1)
        drv.save_screenshot(f"{prefix}-overview.png")
        drv.execute_script("document.getElementById('ram').scrollIntoView()")
        time.sleep(0.3)
        drv.save_screenshot(f"{prefix}-ram.png")
        if drv.find_element("id", "diff").is_displayed():
            drv.execute_script("document.getElementById('diff').scrollIntoView()")
            time.sleep(0.3)
            drv.save_screenshot(f"{prefix}-diff.png")
        if search:
            box = drv.find_element("id", "search")
            box.send_keys(search)
            time.sleep(1)
            drv.execute_script("document.getElementById('devices').scrollIntoView()")
            time.sleep(0.3)
            drv.save_screenshot(f"{prefix}-search.png")
    finally:
        drv.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
