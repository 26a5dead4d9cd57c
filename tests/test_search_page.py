"""The /search service's page in a real browser: Debian's headless chromium, driven by Selenium.

The same tiny corpus and apps as test_search_service.py (conftest's search_service: events at known
times, indexed with the demo CLAP, served on 127.0.0.1:<free port> without auth at / and with an API
key at /secure/, beside /rerank).
The page must find its API next to itself, fill the modes from /healthz, search, list the results
and load each result's recording (through the signed audio URL when a key is set) positioned at
its best matched window. Plain HTTP checks cover the audio route: Range requests and the tokens.

No chromium/chromedriver: the browser tests skip, unless LARCQ_REQUIRE_BROWSER=1 (CI), where
they fail. Selenium Manager never runs: the driver's path is given and SE_OFFLINE is set.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from conftest import SEARCH_API_KEY as API_KEY
from conftest import SEARCH_QUERY as QUERY

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
LOAD_S = 60  # a search on a busy 2-core machine
METADATA_S = 30


@pytest.fixture(scope="module")
def service(search_corpus, search_service):
    """conftest's apps: /search at / (no auth), /secure (API_KEY), /rerank under /rr."""
    return SimpleNamespace(url=search_service, corpus=search_corpus[0] / "corpus")


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service.url, timeout=120) as c:
        yield c


def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return (f"no headless browser for the page tests: {', '.join(missing)} missing "
                "(apt-get install chromium chromium-driver)")
    return None


@pytest.fixture(scope="module")
def driver():
    reason = _browser_missing()
    if reason:
        if os.environ.get("LARCQ_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LARCQ_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                "--no-proxy-server", "--window-size=1200,900"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def _mmss(s: float) -> str:  # the page's time format: 0:04.0
    return f"{int(s // 60)}:{s % 60:04.1f}"


def _best_window(result: dict) -> dict | None:
    return max(result["windows"], key=lambda w: w["similarity"], default=None)


def _wait(driver, seconds: float, cond, what: str, state=None):
    """WebDriverWait with a failure message that says what the page showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.2).until(cond)
    except TimeoutException:
        shown = driver.execute_script(
            "const e = document.getElementById('error'); return {error: e && !e.hidden ? e.textContent : null,"
            " status: (document.getElementById('status') || {}).textContent};")
        extra = f"; {state()}" if state else ""
        pytest.fail(f"timed out after {seconds} s waiting for {what}; page: {shown}{extra}", pytrace=False)


_AUDIO_STATE = ("const a = arguments[0]; return {readyState: a.readyState, networkState: a.networkState,"
                " error: a.error && [a.error.code, a.error.message], currentTime: a.currentTime,"
                " duration: a.duration, src: a.currentSrc};")


def _search_and_check_first(driver, expect: dict) -> None:
    """The results list matches `expect` (POST /search's answer); the first recording is at its best window."""
    from selenium.webdriver.common.by import By

    items = _wait(driver, LOAD_S, lambda d: d.find_elements(By.CSS_SELECTOR, "#results > li.result"), "results")
    assert [li.get_attribute("data-audio-id") for li in items] == [r["audio_id"] for r in expect["results"]]
    assert items[0].get_attribute("data-audio-id") == "a.wav"
    first, top = items[0], expect["results"][0]
    text = first.text
    assert "a.wav" in text and "#1" in text
    for w in top["windows"]:  # every matched chunk, with its window's times
        assert f"{_mmss(w['start_s'])}-{_mmss(w['end_s'])}" in text and w["text"] in text, text
    assert len(first.find_elements(By.XPATH, ".//button[normalize-space()='play from here']")) == len(top["windows"])

    audio = first.find_element(By.TAG_NAME, "audio")
    assert audio.get_attribute("preload") == "metadata" and audio.get_attribute("controls") is not None
    best = _best_window(top)
    start = float(audio.get_attribute("data-start"))
    assert start == (best["start_s"] if best else 0.0)
    state = lambda: driver.execute_script(_AUDIO_STATE, audio)  # noqa: E731
    _wait(driver, METADATA_S, lambda d: d.execute_script("return arguments[0].readyState", audio) >= 1,
          "the first result's audio metadata (readyState >= 1)", state)
    _wait(driver, 10, lambda d: abs(d.execute_script("return arguments[0].currentTime", audio) - start) <= 0.5,
          f"the first result's audio to sit at its best window's start ({start} s)", state)
    mark = first.find_element(By.CSS_SELECTOR, ".track .mark")
    _wait(driver, 10, lambda d: mark.is_displayed(), "the matched window's mark on the track")


def test_page_searches_without_a_key(driver, service, client):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    health = client.get("/healthz").json()
    expect = client.post("/search", json={"query": QUERY})
    assert expect.status_code == 200, expect.text

    driver.get(service.url + "/")
    assert driver.title == "LARCQ search"
    _wait(driver, LOAD_S, lambda d: d.find_elements(By.CSS_SELECTOR, "#mode option"), "the modes from /healthz")
    mode = Select(driver.find_element(By.ID, "mode"))
    assert [o.get_attribute("value") for o in mode.options] == health["modes"]
    assert mode.first_selected_option.get_attribute("value") == health["default_mode"] == expect.json()["mode"]
    assert not driver.find_element(By.ID, "api_key").is_displayed()  # no auth: no key to ask for

    driver.find_element(By.ID, "query").send_keys(QUERY)
    driver.find_element(By.ID, "search").click()
    _search_and_check_first(driver, expect.json())
    assert not driver.find_element(By.ID, "error").is_displayed()


def test_page_with_an_api_key(driver, service, client):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    auth = {"Authorization": f"Bearer {API_KEY}"}
    expect = client.post("/secure/search", json={"query": QUERY}, headers=auth)
    assert expect.status_code == 200, expect.text

    driver.get(service.url + "/secure/")
    key = driver.find_element(By.ID, "api_key")
    _wait(driver, LOAD_S, lambda d: key.is_displayed(), "the API key input (healthz says auth_required)")
    assert key.get_attribute("type") == "password"
    key.clear()
    query = driver.find_element(By.ID, "query")
    query.send_keys(QUERY)
    driver.find_element(By.ID, "search").click()
    error = driver.find_element(By.ID, "error")
    _wait(driver, LOAD_S, lambda d: error.is_displayed() and error.text, "an error for the missing key")
    assert "401" in error.text and "key" in error.text.lower(), error.text
    assert not driver.find_elements(By.CSS_SELECTOR, "#results > li.result")

    key.send_keys(API_KEY)
    query.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut searches too
    _search_and_check_first(driver, expect.json())
    assert not error.is_displayed()
    src = driver.find_element(By.CSS_SELECTOR, "#results > li.result audio").get_attribute("src")
    assert "/secure/audio/a.wav" in src and "token=" in src  # the page plays the signed URL

    driver.refresh()  # the key is kept for the tab's session
    key = driver.find_element(By.ID, "api_key")
    _wait(driver, LOAD_S, lambda d: key.is_displayed(), "the API key input after a reload")
    assert key.get_attribute("value") == API_KEY


def test_page_is_served_as_is_without_auth(client):
    page = resources.files("larcq_ray.search").joinpath("page.html").read_bytes()
    for path in ("/", "/secure/"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:300])
        assert r.headers["content-type"].startswith("text/html") and r.content == page, path


def _tamper(token: str) -> str:
    i = len(token) // 2  # a middle character carries whole bits in any encoding
    c = token[i]
    repl = "0" if c != "0" else "1"
    if c.isalpha():
        repl = "a" if c != "a" else "b"
    return token[:i] + repl + token[i + 1:]


def test_audio_range_requests_and_signed_tokens(service, client):
    data = Path(service.corpus, "a.wav").read_bytes()
    r = client.get("/audio/a.wav", headers={"Range": "bytes=0-99"})
    assert r.status_code == 206, r.text[:300]
    assert r.content == data[:100]
    assert r.headers["content-range"] == f"bytes 0-99/{len(data)}"
    full = client.get("/audio/a.wav")
    assert full.status_code == 200 and full.content == data

    auth = {"Authorization": f"Bearer {API_KEY}"}
    res = client.post("/secure/search", json={"query": QUERY}, headers=auth)
    assert res.status_code == 200, res.text
    url = httpx.URL(res.json()["results"][0]["audio_url"])
    assert url.path == "/secure/audio/a.wav" and url.params.get("token"), url
    token = url.params["token"]
    ok = client.get(str(url), headers={"Range": "bytes=0-99"})
    assert ok.status_code == 206 and ok.content == data[:100]
    other = url.copy_with(path="/secure/audio/b.wav")  # a token names one recording
    for bad in (url.copy_remove_param("token"), url.copy_set_param("token", _tamper(token)), other):
        r = client.get(str(bad))
        assert r.status_code == 401, (str(bad), r.status_code, r.text[:300])
        assert r.json()["error"]["message"], r.text


def test_page_reranks_from_captions(driver, service, client):
    """Ticking "Re-rank with captions" re-orders through /rerank: the stored captions put b.wav first."""
    from selenium.webdriver.common.by import By

    expect = client.post("/search", json={"query": QUERY, "rerank": True}).json()
    assert [r["audio_id"] for r in expect["results"]][0] == "b.wav"
    driver.get(service.url + "/")
    box = driver.find_element(By.ID, "rerank")
    _wait(driver, LOAD_S, lambda d: box.is_enabled(), "the rerank box (healthz: n_captioned > 0)")
    driver.find_element(By.ID, "query").send_keys(QUERY)
    box.click()
    driver.find_element(By.ID, "search").click()
    items = _wait(driver, LOAD_S, lambda d: d.find_elements(By.CSS_SELECTOR, "#results > li.result"), "results")
    assert [li.get_attribute("data-audio-id") for li in items] == [r["audio_id"] for r in expect["results"]]
    assert "CLAP rank 2" in items[0].text
    assert "re-ranked from captions (0 without one)" in driver.find_element(By.ID, "status").text
