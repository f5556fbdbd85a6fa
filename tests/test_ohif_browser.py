"""OHIF, as bundled with MONAI Label, driven in headless Chromium against the app on a real Orthanc.

The 3-slice CT is uploaded to Orthanc, its liver label saved through the server (stored in Orthanc as a SEG) and a
first model version trained from it (cached mode on the real LiteMedSAM embeddings). OHIF then opens the study in
its monai-label mode; the test types the server's URL into the MONAI Label panel, runs the `samora`
auto-segmentation from the panel and checks the overlay appears on the axial view, over the patient's right side
(the liver), which fails if the result's bytes are not in the viewer's frame order.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from app_helpers import start_server, stop_server
from dicom_helpers import orthanc_binary, save_liver_label, start_orthanc, stop_orthanc, train_first_version
from PIL import Image

from samora.data.dicom_grid import read_series_headers

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,  # a training on real LiteMedSAM embeddings and a browser: about 3 min on 2 shared cores
    pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc + DICOMweb plugin not installed (scripts/setup.sh)"),
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="chromium and chromium-driver not installed (scripts/setup.sh)",
    ),
]
CHROME_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --window-size=1400,900"
).split()
# max - min of R, G, B: CT pixels are grey; the translucent liver fill measured 15-40 over the liver, text and
# markers drawn before the run are left out by comparing with the view before it
COLOURED = 15
OVERLAY_PIXELS = 3000  # the liver covered ~8000 screen pixels of the axial view at 1400 x 900


@pytest.fixture(scope="module")
def served(tmp_path_factory, shared_data):
    """Orthanc with the 3-slice CT, and a server on it with a first model version trained on its liver label."""
    tmp = tmp_path_factory.mktemp("ohif")
    dicom = shared_data / "ct_3slice_dcmqi" / "dicom"
    orthanc = start_orthanc(tmp / "orthanc")
    server = None
    try:
        orthanc.upload(dicom)
        conf = {
            "labels": "liver=1",
            "train_every": "0",
            "bootstrap": "off",
            "threads": "2",
            "train_mode": "cached",
            "model_dir": str(tmp / "model"),
        }
        server = start_server(orthanc.dicomweb, conf, tmp / "work")
        series = read_series_headers(dicom)[0]
        save_liver_label(server, dicom, shared_data / "ct_3slice_dcmqi" / "label.nii.gz", tmp)
        train_first_version(server)
        yield {"server": server, "study": str(series.StudyInstanceUID)}
    finally:
        if server is not None:
            assert not stop_server(server), "processes left running after stopping the server"
        stop_orthanc(orthanc)


@pytest.fixture()
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chrome'}"]:
        options.add_argument(flag)
    service = webdriver.chrome.service.Service(CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _axial_pixels(driver) -> tuple[np.ndarray, float]:
    """RGB pixels of the first (axial) viewport's canvas on screen, and the device pixel ratio."""
    canvases = driver.find_elements(By.CSS_SELECTOR, "canvas.cornerstone-canvas")
    if not canvases:
        return np.zeros((1, 1, 3), int), 1.0  # the viewer is still loading
    canvas = canvases[0]
    ratio = float(driver.execute_script("return window.devicePixelRatio") or 1)
    rect = {k: int(round(v * ratio)) for k, v in canvas.rect.items()}
    shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(int)
    return shot[rect["y"] : rect["y"] + rect["height"], rect["x"] : rect["x"] + rect["width"]], ratio


def _coloured(pixels: np.ndarray) -> np.ndarray:
    return (pixels.max(axis=2) - pixels.min(axis=2)) > COLOURED


def _wait(driver, seconds: float, condition, what: str):
    try:
        # the viewer may replace a canvas between finding it and reading it: poll again rather than fail
        wait = WebDriverWait(driver, seconds, poll_frequency=1, ignored_exceptions=[StaleElementReferenceException])
        return wait.until(condition)
    except TimeoutException:
        pytest.fail(f"OHIF: {what} not seen within {seconds:.0f}s; page text: {_text(driver)[:1500]}")


def _text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _connect_panel(driver, url: str) -> None:
    """Type the server's URL into the MONAI Label panel (its default is port 8000) and connect."""
    _wait(driver, 60, ec.presence_of_element_located((By.ID, "monailabelServerURL")), "the server field")
    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Confirm and Hide']"):
        button.click()  # the investigational-use banner covers the bottom of the viewports

    errors = []

    def connect(d) -> bool:
        try:  # the panel re-renders while the viewer loads: find the field anew on each try
            field = d.find_element(By.ID, "monailabelServerURL")
            # select-all and type over: clear() would blur the field empty, and the panel's `new URL('')` throws
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(url.rstrip("/") + "/")
            field.find_element(By.XPATH, "ancestor::tr//button").click()
            return True
        except WebDriverException as e:
            errors.append(e.msg)
            return False

    deadline = time.monotonic() + 60
    while not connect(driver):
        if time.monotonic() > deadline:
            pytest.fail(f"OHIF: the server field did not take the URL: {errors[:1]} ... {errors[-1:]}")
        time.sleep(1)
    _wait(driver, 60, ec.visibility_of_element_located((By.CSS_SELECTOR, "button[title='Run Segmentation']")), "Run")


def test_auto_segmentation_from_the_ohif_panel_shows_the_liver(served, browser, tmp_path):
    server = served["server"]
    browser.get(f"{server.url}/ohif/monai-label?StudyInstanceUIDs={served['study']}")
    # the CT is drawn (bright body pixels in the axial viewport) before the panel is used: it re-renders till then
    _wait(browser, 240, lambda d: (_axial_pixels(d)[0].mean(axis=2) > 100).sum() > 5000, "the CT image")
    _connect_panel(browser, server.url)
    before = _coloured(_axial_pixels(browser)[0])

    browser.find_element(By.CSS_SELECTOR, "button[title='Run Segmentation']").click()
    start = time.monotonic()
    _wait(browser, 180, lambda d: _new_colour(d, before).sum() > OVERLAY_PIXELS, "the segmentation overlay")
    time.sleep(2)  # let the overlay finish drawing before the screenshot
    print(f"auto-segmentation shown {time.monotonic() - start:.1f}s after Run")
    shot = tmp_path / "ohif_samora_liver.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    overlay = _new_colour(browser, before)
    rows, cols = np.nonzero(overlay)
    assert overlay.sum() > OVERLAY_PIXELS, f"only {overlay.sum()} newly coloured pixels in the axial view"
    # radiological display: the patient's right (the liver) is on the viewer's left
    assert cols.mean() < overlay.shape[1] / 2, f"overlay centred at column {cols.mean():.0f} of {overlay.shape[1]}"
    assert "Failed to Run Segmentation" not in _text(browser)


def _new_colour(driver, before: np.ndarray) -> np.ndarray:
    """Pixels of the axial view coloured now that were grey before the run (the overlay)."""
    now = _coloured(_axial_pixels(driver)[0])
    if now.shape != before.shape:
        return np.zeros_like(before)  # the view was resized: wait for the next look
    return now & ~before
