"""Swagger UI and the gallery in a real headless Chromium (Debian chromium + chromedriver, selenium), against a
real server. `make test` installs the browser; elsewhere these tests skip when it is missing."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture
def browser() -> Iterator:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1280,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(condition, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception:  # the page is still rendering
            pass
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the page")


def _rendered(driver, image) -> bool:
    return driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)


def test_swagger_try_it_out_renders_a_grid(server: tuple[str, int], browser) -> None:
    from selenium.webdriver.common.by import By

    url, _ = server
    browser.get(f"{url}/docs")
    operation_id = "operations-generate-generate_samples"
    operation = _wait(lambda: browser.find_element(By.ID, operation_id))
    operation.find_element(By.CLASS_NAME, "opblock-summary").click()
    _wait(lambda: operation.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    name = _wait(lambda: operation.find_element(By.CSS_SELECTOR, "input[placeholder='name']"))
    name.clear()
    name.send_keys("digits-gan")  # the example names the shipped model; the test server has tiny ones
    operation.find_element(By.CSS_SELECTOR, ".execute").click()
    image = _wait(lambda: operation.find_element(By.CSS_SELECTOR, ".response-col_description img"))
    assert _wait(lambda: _rendered(browser, image))


def test_gallery_shows_a_grid_card_and_interpolation(server: tuple[str, int], browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, _ = server
    browser.get(url + "/")
    grid = _wait(lambda: browser.find_element(By.ID, "grid"))
    assert _wait(lambda: _rendered(browser, grid))
    assert browser.find_element(By.ID, "error").text == ""
    Select(browser.find_element(By.ID, "model")).select_by_value("digits-vae")
    _wait(lambda: browser.find_element(By.ID, "interpolate").is_displayed())
    Select(browser.find_element(By.ID, "label")).select_by_value("3")
    Select(browser.find_element(By.ID, "to")).select_by_value("8")
    browser.find_element(By.ID, "interpolate").click()
    morph = browser.find_element(By.ID, "morph")
    assert _wait(lambda: morph.is_displayed() and _rendered(browser, morph))
    assert browser.find_element(By.ID, "error").text == ""


def test_the_full_card_opens_from_the_gallery_under_its_policy(server: tuple[str, int], browser) -> None:
    from selenium.webdriver.common.by import By

    url, _ = server
    browser.get(url + "/")
    assert _wait(lambda: _rendered(browser, browser.find_element(By.ID, "grid")))  # the gallery's script ran
    gallery = browser.current_window_handle
    browser.find_element(By.ID, "report").click()
    _wait(lambda: len(browser.window_handles) == 2)
    browser.switch_to.window(next(h for h in browser.window_handles if h != gallery))
    assert _wait(lambda: browser.current_url.startswith("blob:"))
    grid = _wait(lambda: browser.find_element(By.CSS_SELECTOR, "img[alt='sample grid']"))
    assert _wait(lambda: _rendered(browser, grid))  # a data: image, allowed by the card's own policy
    assert browser.find_element(By.TAG_NAME, "h1").text == "digits-gan"


def test_gallery_shows_hostile_card_values_as_text(tmp_path, tiny_gan, browser) -> None:
    import json

    from selenium.webdriver.common.by import By

    from tests.conftest import launch_server, stop_server

    # class names that are markup are refused when a model loads; a card's values are shown as they are
    hostile = '<img src=x onerror="document.title=\'pwned\'">'
    models = tmp_path / "models"
    shutil.copytree(tiny_gan, models / "digits-gan")
    card = json.loads((models / "digits-gan" / "card.json").read_text())
    card.setdefault("metrics", {})["note"] = hostile
    (models / "digits-gan" / "card.json").write_text(json.dumps(card))
    process, url = launch_server(models, tmp_path / "data")
    try:
        browser.get(url + "/")
        cell = _wait(lambda: next(row for row in browser.find_elements(By.CSS_SELECTOR, "#card tbody tr")
                                  if row.text.startswith("note")))
        assert "<img src=x onerror=" in cell.text  # shown as text (JSON-quoted), not parsed as markup
        assert not browser.find_elements(By.CSS_SELECTOR, "#card img") and browser.title != "pwned"
    finally:
        stop_server(process)
