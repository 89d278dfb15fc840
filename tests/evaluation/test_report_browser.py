"""report.html in a real browser: headless Chromium (Debian's chromium and chromium-driver, which
.ci/run installs) driven by selenium. The page loads without a console error, every image is
drawn, and a click on a column header sorts the scans table. Skipped where Chromium is missing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import MALICIOUS, data_with_markup_name, evaluate_with_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="headless browser test: /usr/bin/chromium and /usr/bin/chromedriver are missing "
    "(apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with its console log kept; nothing is downloaded (selenium is given the
    browser and the driver, so its driver manager never runs)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def report(trained_run, tiny_dataset_shared, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    data = data_with_markup_name(tiny_dataset_shared, root)
    return evaluate_with_report(trained_run, data, root / "eval") / "report.html"


@pytest.fixture
def page(browser, report):
    browser.get(report.as_uri())
    return browser


def test_page_loads_without_console_errors(page):
    assert page.title == "volumetric evaluation report"
    severe = [entry for entry in page.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
    # the scan named like markup is text: no <img src=x> was made of it, nothing ran
    names = page.execute_script(
        "return Array.from(document.querySelectorAll('#scans-table td.path'), td => td.textContent)"
    )
    assert any(name.endswith(MALICIOUS) for name in names)
    assert page.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0


def test_images_are_drawn(page):
    from selenium.webdriver.common.by import By

    images = page.find_elements(By.TAG_NAME, "img")
    classes = [image.get_attribute("class") for image in images]
    assert classes.count("plot") == 3 and classes.count("scan") >= 2  # confusion, ROC, reliability
    for image in images:
        page.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
        assert image.is_displayed()
        assert page.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", image
        )
        shot = Image.open(io.BytesIO(image.screenshot_as_png)).convert("RGB")
        pixels = np.asarray(shot)  # (H, W, 3)
        assert min(shot.size) > 50, shot.size
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        assert len(colours) > 20, (image.get_attribute("alt"), len(colours))  # not blank


def column(page, header: str) -> list[str]:
    return page.execute_script(
        """const table = document.getElementById('scans-table');
        const index = Array.from(table.tHead.rows[0].cells)
            .findIndex(th => th.textContent.trim() === arguments[0]);
        return Array.from(table.tBodies[0].rows, row => row.cells[index].textContent.trim());""",
        header,
    )


def click_header(page, header: str) -> None:
    from selenium.webdriver.common.by import By

    for th in page.find_elements(By.CSS_SELECTOR, "#scans-table thead th"):
        if th.text.strip() == header:
            th.click()
            return
    raise AssertionError(f"no column {header}")


def test_clicking_a_header_sorts_the_scans(page):
    before = column(page, "p(lesion)")
    numbers = [float(v) for v in before]
    assert numbers != sorted(numbers)  # the data set's order is not already sorted
    click_header(page, "p(lesion)")
    ascending = [float(v) for v in column(page, "p(lesion)")]
    assert ascending == sorted(numbers)
    click_header(page, "p(lesion)")
    assert [float(v) for v in column(page, "p(lesion)")] == sorted(numbers, reverse=True)
    click_header(page, "#")  # back to the data set's order, and the same scans as before
    assert column(page, "#") == [str(i) for i in range(1, len(numbers) + 1)]
    assert column(page, "p(lesion)") == before
    severe = [entry for entry in page.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
