"""The report in a real browser: headless Chromium renders every figure, logs no error, runs no injected script.

Chromium is Debian's (/usr/bin/chromium, installed by scripts/install-browser.sh, which `make test`
runs), driven by Playwright's Python API through `executable_path`; Playwright's own browser
download is never used. The full-page screenshot is kept at test-output/report.png.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from triton_workbench.autotune import TuningDatabase
from triton_workbench.reports import write_report
from test_report import expected_figures, populate

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAPTOP_VIEWPORT = {"width": 1366, "height": 768}
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.fail("chromium is not installed: run `bash scripts/install-browser.sh` (make test does it)")
    return path


@pytest.mark.browser
def test_report_renders_every_figure_without_errors_or_injected_script(tmp_path):
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    db = TuningDatabase(tmp_path / "browser.db")
    populate(db)
    path = write_report(db, None, tmp_path / "report.html")
    db.close()

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=LAPTOP_VIEWPORT)
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("dialog", lambda dialog: (problems.append(f"dialog opened: {dialog.message}"), dialog.dismiss()))
            page.on("request", lambda request: request.url.startswith("http") and problems.append(request.url))
            page.goto(path.as_uri(), wait_until="load")
            page.wait_for_function(
                f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected_figures()}",
                timeout=30_000)
            rendered = page.evaluate(
                "[...document.querySelectorAll('.js-plotly-plot')].filter(p => p.querySelector('svg')).length")
            hostile_text = page.evaluate("document.body.innerText.includes('<script>alert(1)</script>')")
            injected = page.evaluate("[...document.scripts].some(s => s.textContent.trim() === 'alert(1)')")
            widest = page.evaluate("Math.max(...[...document.querySelectorAll('.js-plotly-plot')]"
                                   ".map(p => p.getBoundingClientRect().right))")
            OUTPUT.mkdir(exist_ok=True)
            page.screenshot(path=str(OUTPUT / "report.png"), full_page=True)
        finally:
            browser.close()

    assert problems == []
    assert rendered == expected_figures()
    assert hostile_text  # the name shows as text...
    assert not injected  # ...and never as a script
    assert widest <= LAPTOP_VIEWPORT["width"]  # figures fit a laptop screen
