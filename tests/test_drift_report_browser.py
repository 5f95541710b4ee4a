"""The monitor's HTML report opened in a real browser (headless Chromium): the page is whole on its own."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from test_monitoring import CFG, synthetic

from langops.monitoring import detect_drift, write_report

pytestmark = pytest.mark.services

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine")
def test_the_html_report_opens_whole_in_a_real_browser(tmp_path):
    report = detect_drift(synthetic(2000, seed=1), synthetic(800, seed=30, drift="new_topic"), CFG)
    write_report(report, tmp_path / "report")
    page = tmp_path / "alone" / "drift-report.html"  # apart from the PNGs: what an attachment or a download is
    page.parent.mkdir()
    shutil.copy(tmp_path / "report" / "drift-report.html", page)
    shown = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = shown.stdout
    assert 'data-images-shown="3"' in dom, dom[:500]  # the browser decoded the three plots, from the page alone
    assert "Monitoring: DRIFT" in dom and "embedding_mmd" in dom
