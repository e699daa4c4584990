"""The web console (/ui) in a real headless Chromium, against a real daemon and gateway.

The browser tests need Debian's `chromium` and `chromium-driver` (scripts/setup.sh installs
them) and the `selenium` package; without them they skip and say why. Screenshots of the
four panels go to a temporary directory (its path is printed), or to $RESISO_SCREENSHOTS.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import pytest

httpx = pytest.importorskip("httpx")


from .conftest import start_gateway, wait_for  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# the default heartbeat (500 ms): Chromium and three models share a small machine, and a
# starting worker must not be taken for a hung one
CONSOLE_CONFIG = """
[http]
enabled = true
listen = "127.0.0.1:{port}"
[domains.llm]
kind = "llm"
context_size = 1024
max_tokens_limit = 64
default_max_tokens = 32
[domains.tts]
kind = "tts"
max_chars = 300
[domains.image]
kind = "image"
default_width = 64
default_height = 64
default_steps = 8
max_side = 128
max_queue = 8
"""

KEYED_CONFIG = """
[http]
enabled = true
listen = "127.0.0.1:{port}"
api_key = "s3cret"
[domains.tts]
kind = "tts"
max_chars = 300
"""


def ready_gateway(make, config: str):
    d = start_gateway(make, config)
    health = httpx.get(d.base + "/api/health", timeout=10).json()
    assert health["status"] == "ok", f"domains not ready: {health}\n{d.read_log()[-3000:]}"
    return d


@pytest.fixture(scope="module")
def gw(make_module_daemon):
    return ready_gateway(make_module_daemon, CONSOLE_CONFIG)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install 'resiso[test]')")
    if not (os.path.exists(CHROMIUM) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("chromium and chromium-driver are not installed (scripts/setup.sh installs "
                    "them with apt-get)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1440,1000", "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    # a driver path given: Selenium Manager never tries to download one
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    drv.set_script_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def shots(request, tmp_path_factory):
    path = os.environ.get("RESISO_SCREENSHOTS") or str(tmp_path_factory.mktemp("console-shots"))
    os.makedirs(path, exist_ok=True)
    # shown on the terminal as it happens, not only in a failed test's captured output
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\nconsole screenshots: {path}")
    return path


def until(drv, pred, timeout: float = 60, what: str = "condition"):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    # a cell the live feed redrew between finding it and reading it is simply read again
    return WebDriverWait(drv, timeout, poll_frequency=0.1, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(
        lambda d: pred(d), message=f"timed out after {timeout}s waiting for {what}")


def js(drv, script: str, *args):
    return drv.execute_script(script, *args)


def by_css(drv, sel: str):
    from selenium.webdriver.common.by import By
    return drv.find_element(By.CSS_SELECTOR, sel)


def open_panel(drv, base: str, panel: str) -> None:
    if not drv.current_url.startswith(base + "/ui"):
        drv.get(f"{base}/ui#{panel}")
    else:
        js(drv, "location.hash = arguments[0]", panel)
    until(drv, lambda d: by_css(d, f"#{panel}").is_displayed(), 10, f"the {panel} panel")


def fill(drv, sel: str, value: str) -> None:
    el = by_css(drv, sel)
    el.clear()
    el.send_keys(value)


def no_error_visible(drv, sel: str) -> None:
    el = by_css(drv, sel)
    assert not el.is_displayed(), el.text


# --- the gateway's console routes ---------------------------------------------------------

def read_feed(lines, want, timeout: float = 30.0) -> dict:
    """The next snapshot that `want`s, from one stream's line iterator (a second iterator
    over the same response would close it)."""
    deadline = time.monotonic() + timeout
    for line in lines:
        if line.startswith("data: "):
            msg = json.loads(line[6:])
            if want(msg):
                return msg
        assert time.monotonic() < deadline, f"no such snapshot in {timeout}s; last: {line[-300:]}"
    raise AssertionError("the feed ended")


def test_console_routes_and_shared_feed(gw):
    page = httpx.get(gw.base + "/ui", timeout=10)
    assert page.status_code == 200 and "/ui/console.js" in page.text
    for name, ctype in (("console.js", "javascript"), ("console.css", "css")):
        r = httpx.get(f"{gw.base}/ui/{name}", timeout=10)
        assert r.status_code == 200 and ctype in r.headers["content-type"]
    assert httpx.get(gw.base + "/ui/nope.js", timeout=10).status_code == 404
    # two readers share the gateway's one monitor; each snapshot says how many read it
    url = gw.base + "/api/console/feed"
    with httpx.stream("GET", url, timeout=30) as ra:
        a = ra.iter_lines()
        first = read_feed(a, lambda m: m["type"] == "status")
        assert set(first["domains"]) == {"llm", "tts", "image"}
        assert all(d["workers"] for d in first["domains"].values())
        with httpx.stream("GET", url, timeout=30) as rb:
            b = rb.iter_lines()
            read_feed(b, lambda m: m.get("viewers") == 2)
            read_feed(a, lambda m: m.get("viewers") == 2)
            assert gw.status()["monitors"] == 1  # two tabs, one monitor in the daemon
        read_feed(a, lambda m: m.get("viewers") == 1)
    # the last tab gone, the gateway stops saying alive and the daemon forgets the monitor
    wait_for(lambda: gw.status()["monitors"] == 0, 15, 0.2, "the monitor closed")
    # a job with its parameters, and a readable 404
    job = httpx.post(gw.base + "/api/image/generate", timeout=30,
                     json={"prompt": "a red square", "steps": 2}).json()
    wait_for(lambda: httpx.get(f"{gw.base}/api/jobs/{job['task_id']}", timeout=10)
             .json()["status"] == "completed", 120, 0.2, "image done")
    rec = httpx.get(f"{gw.base}/api/jobs/{job['task_id']}", timeout=10).json()
    assert rec["params"]["prompt"] == "a red square"
    assert rec["image_url"] == f"/images/{job['task_id']}.png"
    missing = httpx.get(gw.base + "/api/jobs/img_nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    items = httpx.get(gw.base + "/api/gallery", timeout=10).json()["items"]
    assert job["task_id"] in [i["task_id"] for i in items]


# --- the page in Chromium -----------------------------------------------------------------

def test_machine_panel_lists_domains_and_workers(gw, browser, shots):
    open_panel(browser, gw.base, "machine")
    until(browser, lambda d: len(d.find_elements("css selector", "article.domain")) == 3,
          60, "three domain cards")
    cards = {c.get_attribute("data-domain"): c
             for c in browser.find_elements("css selector", "article.domain")}
    assert set(cards) == {"llm", "tts", "image"}
    st = httpx.get(gw.base + "/api/health", timeout=10).json()
    assert st["status"] == "ok"
    for name, card in cards.items():
        text = card.text
        assert st["domains"][name]["kind"] in text
        rows = card.find_elements("css selector", "table.workers tbody tr")
        assert rows, f"{name} shows no workers"
        pid = rows[0].find_elements("css selector", "td")[1].text
        assert pid.isdigit() and int(pid) > 0, pid
        assert "p95" in text and "preemptions" in text
    assert "llama_cpp" in cards["llm"].text and "diffusers" in cards["image"].text
    assert by_css(browser, "#conn").text == "live"
    browser.save_screenshot(os.path.join(shots, "machine.png"))


def test_chat_streams_text_into_the_page(gw, browser):
    open_panel(browser, gw.base, "playground")
    until(browser, lambda d: by_css(d, "#conn").text == "live", 30, "live feed")
    # every change of the answer's text, with its time: the text must grow while it streams
    js(browser, """
        window.__chat = [];
        new MutationObserver(() => {
          const t = document.querySelectorAll('#chat-log .msg.assistant .text');
          if (t.length) window.__chat.push([performance.now(), t[t.length - 1].textContent]);
        }).observe(document.querySelector('#chat-log'),
                   {subtree: true, childList: true, characterData: true});
    """)
    fill(browser, "#chat-input", "Count from one to twenty, in words.")
    fill(browser, "#chat-max", "48")
    fill(browser, "#chat-temp", "0")
    by_css(browser, "#chat-send").click()
    until(browser, lambda d: js(d, "return document.querySelector('#chat-log .msg.assistant') "
                                   "&& !document.querySelector('#chat-log .streaming')"),
          120, "the answer to end")
    no_error_visible(browser, "#chat-error")
    seen = js(browser, "return window.__chat")
    texts = [t for _, t in seen if t and t != "—"]
    growing = [t for i, t in enumerate(texts) if i == 0 or t != texts[i - 1]]
    assert len(growing) >= 3, growing
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(growing, growing[1:]))
    times = [ts for ts, t in seen if t in growing]
    assert times[-1] - times[0] > 20, "the text arrived at once, not streamed"
    final = browser.find_elements("css selector", "#chat-log .msg.assistant .text")[-1].text
    assert final.strip() and final.strip() == growing[-1].strip()


def test_tts_gives_a_playable_wav(gw, browser):
    open_panel(browser, gw.base, "playground")
    options = browser.find_elements("css selector", "#tts-voice option")
    voices = [o.get_attribute("value") for o in options if o.get_attribute("value")]
    assert voices, "no voice listed for the tts domain"
    from selenium.webdriver.support.ui import Select
    pick = next((v for v in voices if "joe" in v.lower()), voices[0])
    Select(by_css(browser, "#tts-voice")).select_by_value(pick)
    fill(browser, "#tts-text", "Hello from the resiso console.")
    by_css(browser, "#tts-send").click()
    until(browser, lambda d: by_css(d, "#tts-audio").is_displayed()
          or by_css(d, "#tts-error").is_displayed(), 120, "audio or an error")
    no_error_visible(browser, "#tts-error")
    src = by_css(browser, "#tts-audio").get_property("src")
    wav = httpx.get(src, timeout=30)
    assert wav.status_code == 200
    assert wav.content[:4] == b"RIFF" and wav.content[8:12] == b"WAVE"
    # Chromium decoded it: it knows the duration, so the player can play it
    until(browser, lambda d: js(d, "const a = document.querySelector('#tts-audio');"
                                   "return a.readyState >= 1 && a.duration > 0"), 30,
          "the audio to load")
    assert "of audio" in by_css(browser, "#tts-meta").text


def test_image_shows_progress_then_the_png(gw, browser, shots):
    open_panel(browser, gw.base, "playground")
    # refused input reads as the API's sentence, not a trace or a blank
    fill(browser, "#image-prompt", "too wide")
    fill(browser, "#image-width", "256")
    by_css(browser, "#image-send").click()
    until(browser, lambda d: by_css(d, "#image-error").is_displayed(), 30, "an error")
    err = by_css(browser, "#image-error").text
    assert "width" in err and "128" in err and "bad_request" in err, err
    assert "Traceback" not in err
    js(browser, """
        window.__progress = [];
        new MutationObserver(() => window.__progress.push(
            parseFloat(document.querySelector('#image-progress').dataset.value)))
          .observe(document.querySelector('#image-progress'),
                   {attributes: true, attributeFilter: ['data-value']});
    """)
    fill(browser, "#image-prompt", "a lighthouse at dusk")
    fill(browser, "#image-width", "128")
    fill(browser, "#image-height", "128")
    fill(browser, "#image-steps", "60")
    fill(browser, "#image-seed", "7")
    by_css(browser, "#image-send").click()
    until(browser, lambda d: js(d, "const i = document.querySelector('#image-result');"
                                   "return !i.hidden && i.complete && i.naturalWidth > 0")
          or by_css(d, "#image-error").is_displayed(), 240, "the picture")
    no_error_visible(browser, "#image-error")
    assert js(browser, "return document.querySelector('#image-result').naturalWidth") == 128
    values = js(browser, "return window.__progress")
    middle = sorted({v for v in values if 0 < v < 1})
    assert len(middle) >= 3, values
    assert values == sorted(values), values  # the bar only moves forward
    assert values[-1] == 1
    assert "done in" in by_css(browser, "#image-status").text
    browser.save_screenshot(os.path.join(shots, "playground.png"))


def test_cancel_from_the_jobs_list(gw, browser, shots):
    def submit(prompt):
        return httpx.post(gw.base + "/api/image/generate", timeout=30, json={
            "prompt": prompt, "steps": 150, "width": 128, "height": 128}).json()["task_id"]
    first, second = submit("a long one to cancel"), submit("the next in line")
    open_panel(browser, gw.base, "jobs")

    def row(tid):
        return f"#jobs-table tr[data-id='{tid}']"

    def state(d, tid):
        return by_css(d, row(tid)).get_attribute("data-state")
    until(browser, lambda d: state(d, first) == "running" and float(
        by_css(d, row(first) + " .bar").get_attribute("data-value") or 0) > 0,
          120, "the first job running with progress")
    assert state(browser, second) == "queued"
    assert by_css(browser, row(second)).find_elements("css selector", "td")[4].text == "#1"
    browser.save_screenshot(os.path.join(shots, "jobs.png"))
    by_css(browser, row(first) + " button.cancel").click()
    until(browser, lambda d: state(d, first) == "cancelled", 60, "the first job cancelled")
    assert httpx.get(f"{gw.base}/api/image/progress/{first}",
                     timeout=10).json()["status"] == "cancelled"
    # the next one runs; its details show its parameters, and cancel it from there
    until(browser, lambda d: state(d, second) == "running", 60, "the second job running")
    by_css(browser, row(second) + " td.id").click()
    until(browser, lambda d: "the next in line" in by_css(d, "#job-detail").text, 30,
          "the job's parameters")
    assert "timings" in by_css(browser, "#job-detail").text.lower()
    browser.save_screenshot(os.path.join(shots, "jobs-detail.png"))
    by_css(browser, "#job-detail button.cancel").click()
    until(browser, lambda d: state(d, second) == "cancelled", 60, "the second job cancelled")
    until(browser, lambda d: "the job is cancelled" in by_css(d, "#job-detail").text, 30,
          "the details to follow")
    # the filters: by state, then by a domain the jobs are not in
    from selenium.webdriver.support.ui import Select
    Select(by_css(browser, "#filter-state")).select_by_value("cancelled")
    rows = browser.find_elements("css selector", "#jobs-table tbody tr")
    assert len(rows) >= 2 and all(r.get_attribute("data-state") == "cancelled" for r in rows)
    Select(by_css(browser, "#filter-domain")).select_by_value("llm")
    assert not browser.find_elements("css selector", row(first))
    Select(by_css(browser, "#filter-state")).select_by_value("")
    Select(by_css(browser, "#filter-domain")).select_by_value("")
    by_css(browser, "#job-detail button.close").click()


def test_gallery_shows_images_and_audio(gw, browser, shots):
    open_panel(browser, gw.base, "gallery")
    until(browser, lambda d: js(d, """
        const imgs = [...document.querySelectorAll('#gallery-grid figure.image img')];
        const auds = document.querySelectorAll('#gallery-grid figure.tts audio');
        return imgs.length > 0 && auds.length > 0
            && imgs.every(i => i.complete && i.naturalWidth > 0);
    """), 60, "images and audio in the gallery")
    browser.save_screenshot(os.path.join(shots, "gallery.png"))


def test_api_key_prompt_then_the_page_works(make_module_daemon, browser, shots):
    d = ready_gateway(make_module_daemon, KEYED_CONFIG)
    # the page loads without the key (it holds no data); the data does not
    assert httpx.get(d.base + "/ui", timeout=10).status_code == 200
    assert httpx.get(d.base + "/api/console/feed", timeout=10).status_code == 401
    browser.get(d.base + "/ui#machine")
    until(browser, lambda b: by_css(b, "#key-dialog").is_displayed(), 30, "the key prompt")
    assert not browser.find_elements("css selector", "article.domain")
    assert not by_css(browser, "#key-error").is_displayed()
    fill(browser, "#key-input", "wrong")
    by_css(browser, "#key-submit").click()
    until(browser, lambda b: by_css(b, "#key-error").is_displayed(), 30, "the key refused")
    browser.save_screenshot(os.path.join(shots, "key-prompt.png"))
    fill(browser, "#key-input", "s3cret")
    by_css(browser, "#key-submit").click()
    until(browser, lambda b: browser.find_elements("css selector", "article.domain"), 60,
          "the machine panel")
    assert not by_css(browser, "#key-dialog").is_displayed()
    assert js(browser, "return sessionStorage.getItem('resiso.apiKey')") == "s3cret"
    # media need the key too: the page fetches them with it
    open_panel(browser, d.base, "playground")
    fill(browser, "#tts-text", "The key works.")
    by_css(browser, "#tts-send").click()
    until(browser, lambda b: js(b, "const a = document.querySelector('#tts-audio');"
                                   "return !a.hidden && a.readyState >= 1 && a.duration > 0")
          or by_css(b, "#tts-error").is_displayed(), 120, "audio with the key")
    no_error_visible(browser, "#tts-error")
    assert by_css(browser, "#tts-audio").get_property("src").startswith("blob:")
    assert not by_css(browser, "#key-dialog").is_displayed()
