"""HTML report in a real browser (headless chromium): no console errors, no network, sorting,
filtering, expanding, and hostile log text shown as text without running.

Needs the distribution's chromium and chromedriver (`make browser`). Skipped with a reason when
they are missing, except under CI=true, where a missing browser fails the run.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from esxi_anomaly.report.html import write_html

from .conftest import XSS_QUERY, make_ranked

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: browser tests must run; install chromium and chromium-driver)")
    pytest.skip(f"{reason}; install with `apt-get install chromium chromium-driver` or `make browser`")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (path.is_file() and os.access(path, os.X_OK)):
            _unavailable(f"{path} is missing")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    except Exception as exc:  # a browser that cannot start is as good as missing
        _unavailable(f"headless chromium did not start: {exc}")
    yield browser
    browser.quit()


@pytest.fixture
def page(driver, tmp_path):
    path = write_html(make_ranked(), tmp_path / "report.html", summary={"env": "prod", "threshold": 0.6})
    driver.get(path.as_uri())
    return driver


def _ranks(driver) -> list[str]:
    return [td.text for td in driver.find_elements("css selector", "#ranked tbody tr:not([hidden]) td[data-col=rank]")]


def _severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_loads_without_console_errors_or_network_requests(page):
    assert _ranks(page) == ["1", "2", "3", "4", "5"]
    assert page.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert len(page.find_elements("css selector", "#timelines svg")) == 3
    assert page.find_element("id", "title").text == "esxi-anomaly report \u2014 prod"
    assert _severe(page) == []


def test_hostile_dns_name_is_text_and_nothing_ran(page):
    cell = page.find_element("css selector", "#ranked tbody tr:nth-child(2) td[data-col=query]")
    assert cell.get_attribute("textContent") == XSS_QUERY
    assert cell.find_elements("css selector", "*") == []
    why = page.find_element("css selector", "#ranked tbody tr:nth-child(2) td[data-col=explanation]")
    assert why.get_attribute("textContent") == '</script><img src=x onerror="window.__pwned=2">'
    assert page.execute_script("return typeof window.__pwned") == "undefined"
    assert page.execute_script("return document.querySelectorAll('img').length") == 0
    assert _severe(page) == []


def test_clicking_a_header_sorts_and_clicking_again_reverses(page):
    header = page.find_element("css selector", "#ranked th[data-col=dst_port]")
    header.click()
    assert _ranks(page) == ["4", "5", "1", "2", "3"]  # ports 53, 443, 1117, 1118, 4443
    header.click()
    assert _ranks(page) == ["3", "2", "1", "5", "4"]
    page.find_element("css selector", "#ranked th[data-col=src_name]").click()
    assert _ranks(page) == ["3", "4", "5", "1", "2"]  # esx01-vmk0, vm-db-01 x2, vm-web-03 x2 (stable)


def test_filter_box_and_entity_click_filter_rows(page):
    box = page.find_element("id", "filter")
    box.send_keys("EVIL.example")
    assert _ranks(page) == ["2"]
    assert page.find_element("id", "count").text == "1 of 5 rows"
    page.find_element("css selector", "#entities tbody tr:nth-child(3)").click()  # vm-db-01
    assert box.get_attribute("value") == "10.0.2.9"
    assert _ranks(page) == ["4", "5"]


def test_row_expands_to_its_explanation(page):
    page.find_element("css selector", "#ranked tbody tr:first-child button.toggle").click()
    detail = page.find_element("css selector", "#ranked tbody tr.detail")
    assert "port 1117 = 19*57+34 (APT12 a*b+c) from A 19.57.34.8" in detail.text
    assert "port_rarity=+0.31; dns_match_significance=+0.22" in detail.text
    page.find_element("css selector", "#ranked tbody tr:first-child button.toggle").click()
    assert page.find_elements("css selector", "#ranked tbody tr.detail") == []


def test_seen_by_shows_as_text_filters_and_expands(driver, tmp_path):
    ranked = make_ranked()
    hostile = 'nsx_dfw:<img src=x onerror="window.__pwned=3">'
    ranked["seen_by"] = ["nsx_dfw:esx01 nsx_dfw:esx03", hostile, "esxcli_connections:esx01", "", "zeek_conn_tsv"]
    driver.get(write_html(ranked, tmp_path / "seen.html").as_uri())
    cells = driver.find_elements("css selector", "#ranked tbody tr td[data-col=seen_by]")
    assert [c.get_attribute("textContent") for c in cells] == ranked["seen_by"].tolist()
    assert cells[1].find_elements("css selector", "*") == []
    assert driver.find_element("css selector", "#ranked th[data-col=seen_by]").text == "Seen by"
    driver.find_element("id", "filter").send_keys("nsx_dfw:esx03")
    assert _ranks(driver) == ["1"]
    driver.find_element("css selector", "#ranked tbody tr:first-child button.toggle").click()
    assert "nsx_dfw:esx01 nsx_dfw:esx03" in driver.find_element("css selector", "#ranked tbody tr.detail").text
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert _severe(driver) == []


# -- incidents, histogram, verdicts (issue 16) ---------------------------------------------------

def _incident_report(tmp_path):
    ranked = make_ranked()
    ranked["alert"] = [True, True, True, False, False]
    ranked.loc[1, "query"] = ranked.loc[0, "query"]   # ranks 1 and 2: one incident of two connections
    return write_html(ranked, tmp_path / "incidents.html", summary={"env": "prod", "threshold": 0.6})


def test_opens_on_incidents_that_expand_to_their_connections(driver, tmp_path):
    driver.get(_incident_report(tmp_path).as_uri())
    sections = [s.get_attribute("id") for s in driver.find_elements("css selector", "main > section")]
    assert sections[:2] == ["summary-section", "incidents-section"]
    rows = driver.find_elements("css selector", "#incidents tbody tr")
    assert [r.find_element("css selector", "td[data-col=rank]").text for r in rows] == ["1", "2", "3", "4"]
    assert rows[0].find_element("css selector", "td[data-col=connections]").text == "2"
    assert rows[0].find_element("css selector", "td[data-col=alert]").text == "alert"
    assert rows[0].find_element("css selector", "td[data-col=query]").get_attribute("textContent") == \
        '=HYPERLINK("http://x")'
    rows[0].find_element("css selector", "button.toggle").click()
    detail = driver.find_element("css selector", "#incidents tr.detail")
    cells = detail.find_elements("css selector", "table.connections tbody tr")
    assert len(cells) == 2
    assert "port 1117 = 19*57+34" in cells[0].text
    assert cells[1].find_element("css selector", "td.why").get_attribute("textContent") == \
        '</script><img src=x onerror="window.__pwned=2">'
    assert "2 of 2 connections" in detail.text
    # the Why column wraps instead of cutting the sentence
    why = driver.find_element("css selector", "#ranked tbody tr td[data-col=explanation]")
    assert why.value_of_css_property("white-space") == "normal"
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert _severe(driver) == []


def test_histogram_renders_with_the_alert_level(driver, tmp_path):
    driver.get(_incident_report(tmp_path).as_uri())
    histogram = driver.find_element("id", "score-histogram")
    assert len(histogram.find_elements("css selector", "g.bin rect")) == 5    # five scores, five bins
    level = driver.find_element("id", "alert-level")
    assert float(level.get_attribute("x1")) > 56
    assert "alert level 0.600" in histogram.text
    above = [r.get_attribute("fill") for r in histogram.find_elements("css selector", "g.bin rect")]
    assert above.count("#c62828") == 3        # 0.64, 0.91, 0.97 at or above the level
    assert _severe(driver) == []


def test_verdict_download_holds_the_marked_incidents(driver, tmp_path):
    import time

    from selenium.webdriver.support.ui import Select

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.get(_incident_report(tmp_path).as_uri())
    selects = driver.find_elements("css selector", "#incidents td.verdict select")
    Select(selects[0]).select_by_value("malicious")
    Select(selects[3]).select_by_value("benign")
    assert driver.find_element("id", "verdict-count").text == "2 incidents marked, 3 verdict lines"
    driver.find_element("id", "download-verdicts").click()
    for _ in range(100):
        done = [p for p in downloads.iterdir() if p.suffix == ".csv"]
        if done:
            break
        time.sleep(0.05)
    assert [p.name for p in done] == ["verdicts.csv"]
    text = done[0].read_bytes().decode("utf-8")
    assert text.split("\r\n")[0] == "event_id,verdict,note,src_ip,query,dst_port"
    # what `label --import-csv` reads: one verdict per event of each marked incident, formulas neutralised
    from esxi_anomaly.feedback import FeedbackStore

    store = FeedbackStore(tmp_path / "feedback.csv")
    assert store.import_csv(str(done[0])) == 3
    verdicts = store.read()
    assert list(verdicts["event_id"]) == ["CxA1", "CxA2", "CxC2"]
    assert list(verdicts["verdict"]) == ["malicious", "malicious", "benign"]
    assert list(verdicts["query"]) == ['=HYPERLINK("http://x")', '=HYPERLINK("http://x")', "@SUM(1)"]
    assert list(verdicts["dst_port"]) == ["1117", "1118", "443"]
    assert ',"\'=HYPERLINK(""http://x"")",' in text and ",'@SUM(1)," in text   # safe to open in a spreadsheet
    assert store.suppressions().to_dict("records") == [{"src_ip": "10.0.2.9", "query": "@SUM(1)", "dst_port": "443"}]
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert _severe(driver) == []
