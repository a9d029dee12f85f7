"""The HTML page in a real browser: headless Chromium (Debian's chromium + chromium-driver, which
`make test` installs through `make system-deps`) driven by selenium, with the network blocked.

Each page is loaded from a file with every http(s)/ws request blocked and the browser offline; the tests
check that nothing was requested but the file itself, that the console stays free of errors, that the
highlighted values are the explanation's (3 significant digits) before and after clicking a token,
switching methods and moving the layer slider, and that screenshots are not blank. Set
ATTNFLOW_SCREENSHOTS=DIR to keep the screenshots."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from html_page import hostile_explanation, same_to_3_digits
from plot_traces import decoder_trace, renormalised, seq2seq_trace

import attnflow

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
INSTALL = "apt-get install -y chromium chromium-driver   (or: make system-deps)"
TEXT = "The keys to the cabinet are on the table."


def _browser_paths() -> tuple[str, str]:
    binary = next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail(f"The browser tests need headless Chromium and its driver; install them: {INSTALL}")
    return binary, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["http://*", "https://*", "ws://*", "wss://*"]})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                           {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    yield driver
    driver.quit()


def open_page(browser, path: Path) -> None:
    browser.get_log("browser")
    browser.get_log("performance")
    browser.get(path.as_uri())
    deadline = time.monotonic() + 30
    while browser.execute_script("return document.body.dataset.ready") != "1":
        assert time.monotonic() < deadline, browser.find_element("id", "status").text
        time.sleep(0.05)


def console_errors(browser) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def requested_urls(browser) -> list[str]:
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def shown_scores(browser, stream: str) -> np.ndarray:
    values = browser.execute_script(
        "return Array.from(document.querySelectorAll(`#text .tok[data-stream='${arguments[0]}']`))"
        ".map(s => s.dataset.score)", stream)
    return np.array([float(v) if v != "" else np.nan for v in values])


def click_token(browser, stream: str, index: int) -> None:
    browser.find_element("css selector", f"#text .tok[data-stream='{stream}'][data-index='{index}']").click()


def screenshot(browser, tmp_path: Path, name: str) -> Path:
    from PIL import Image

    path = tmp_path / f"{name}.png"
    browser.save_screenshot(str(path))
    keep = os.environ.get("ATTNFLOW_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "the screenshot is (nearly) one colour"
    assert (pixels.min(axis=-1) < 200).mean() > 0.02, "the screenshot is (nearly) blank"
    return path


@pytest.fixture(scope="module")
def minilm_page(minilm_dir, tmp_path_factory):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir)
    trace = attnflow.capture(model, tokens=tokenizer, **tokenizer([TEXT], return_tensors="pt"))
    explanation = attnflow.explain(trace)
    path = tmp_path_factory.mktemp("page") / "minilm.html"
    explanation.to_html(trace, path=path)
    return trace, explanation, path


@pytest.mark.slow
def test_click_switch_and_slide_show_the_explanations_values(browser, minilm_page, tmp_path):
    trace, explanation, path = minilm_page
    tokens = trace.tokens[0]
    open_page(browser, path)
    assert requested_urls(browser) == [path.as_uri()]  # the file itself, nothing else
    # first view: raw attention after the last layer, what [CLS] draws on
    same_to_3_digits(shown_scores(browser, "tokens"), explanation.layers("raw")[-1, 0, 0])
    screenshot(browser, tmp_path, "page-first-view")

    cabinet = tokens.index("cabinet")
    click_token(browser, "tokens", cabinet)
    assert "“cabinet”" in browser.find_element("id", "status").text
    same_to_3_digits(shown_scores(browser, "tokens"), explanation.layers("raw")[-1, 0, cabinet])
    assert browser.find_element("css selector", "#text .tok.source").text == "cabinet"

    browser.find_element("css selector", "label[for='method-rollout']").click()
    same_to_3_digits(shown_scores(browser, "tokens"), explanation.layers("rollout")[-1, 0, cabinet])

    from selenium.webdriver.common.keys import Keys

    slider = browser.find_element("id", "layer")
    slider.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT)
    assert browser.execute_script("return document.body.dataset.layer") == "3"
    same_to_3_digits(shown_scores(browser, "tokens"), explanation.layers("rollout")[3, 0, cabinet])
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('#compare td[data-method=flow]')).map(c => c.dataset.score)")
    same_to_3_digits(np.array(cells, dtype=float), explanation["flow"][0, cabinet])  # flow: its last layer only

    browser.find_element("id", "exclude-special").click()
    shown = shown_scores(browser, "tokens")
    special = trace.special[0]
    assert np.isnan(shown[special]).all()
    same_to_3_digits(shown[~special], renormalised(explanation.layers("rollout")[3, 0, cabinet], ~special))
    browser.find_element("id", "exclude-special").click()

    browser.find_element("css selector", "#head-buttons button[data-head='3']").click()
    drawn = browser.execute_script(
        "const c = document.getElementById('heads'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;")
    assert drawn > 500
    assert browser.find_element("id", "head-layer").get_attribute("value") == "3"  # follows the slider
    browser.execute_script("document.getElementById('heads-panel').scrollIntoView()")
    screenshot(browser, tmp_path, "page-heads")
    assert console_errors(browser) == []
    assert requested_urls(browser) == []


def test_encoder_decoder_page_shows_the_cross_view(browser, tmp_path):
    trace = seq2seq_trace()
    explanation = attnflow.explain(trace)
    path = tmp_path / "seq2seq.html"
    explanation.to_html(trace, path=path)
    open_page(browser, path)
    assert "encoder-decoder view" in browser.find_element("id", "map-caption").text
    assert browser.find_element("id", "map-stream").get_attribute("value") == "encoder"
    # a decoder is causal: the page starts on its last token
    same_to_3_digits(shown_scores(browser, "encoder"), explanation.scores("raw", "encoder", layer=-1)[0, 3])
    click_token(browser, "decoder", 1)
    same_to_3_digits(shown_scores(browser, "encoder"), explanation.layers("raw")["encoder"][-1, 0, 1])
    same_to_3_digits(shown_scores(browser, "decoder"), explanation.layers("raw")["decoder"][-1, 0, 1])
    screenshot(browser, tmp_path, "page-seq2seq")
    assert console_errors(browser) == []
    assert requested_urls(browser) == [path.as_uri()]


def test_decoder_page_shows_generated_over_prompt(browser, tmp_path):
    trace = decoder_trace()
    explanation = attnflow.explain(trace, ["rollout", "flow"])
    path = tmp_path / "decoder.html"
    explanation.to_html(trace, path=path)
    open_page(browser, path)
    assert "generated × prompt view (the prompt is the first 4 tokens" in browser.find_element("id", "map-caption").text
    same_to_3_digits(shown_scores(browser, "tokens"), explanation.layers("rollout")[-1, 0, 7])
    screenshot(browser, tmp_path, "page-decoder")
    assert console_errors(browser) == []


def test_comment_and_script_openers_in_every_string_render(browser, tmp_path):
    """Labels, layer names, model name, metadata and title carrying ``<!--<script>``, ``</script>``, ``<!--`` and
    ``-->``: the viewer runs (the page leaves "Loading…"), shows each label as it is and runs nothing else."""
    trace, explanation, labels, title = hostile_explanation()
    path = tmp_path / "hostile.html"
    explanation.to_html(trace, path=path, title=title)
    open_page(browser, path)
    assert browser.find_element("id", "status").text != "Loading…"
    assert browser.title == title and title in browser.find_element("css selector", "h1").text
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('#text .tok')).map(s => s.getAttribute('title'))")
    assert [text.split(" (tokens ")[0] for text in shown] == labels
    assert browser.execute_script("return document.scripts.length") == 2
    same_to_3_digits(shown_scores(browser, "tokens"), explanation.layers("raw")[-1, 0, 0])
    assert console_errors(browser) == []
    assert requested_urls(browser) == [path.as_uri()]
