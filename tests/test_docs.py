"""The documentation site builds strictly (broken links, missing pages and API objects that do
not resolve are errors) and its pages open in headless Chromium with the API reference
rendered from the docstrings."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_docs_build_strictly_with_the_api_reference(site):
    for page in ("index.html", "api/index.html", "methods/index.html", "reproductions/index.html",
                 "operations/index.html", "architecture/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("make_config", "load_run", "KDLoss", "kd_loss", "LogitMSE", "build_model"):
        assert name in api, name
    assert "A validated config from a Config" in api  # a docstring, rendered


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver not installed")
def test_docs_pages_open_in_headless_chromium(site, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1200,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        for page, heading in (("index.html", "kdlab"), ("methods/index.html", "Distillation methods"),
                              ("api/index.html", "Python API")):
            driver.get((site / page).as_uri())
            assert heading in driver.title, (page, driver.title)
            assert driver.find_elements("tag name", "h1"), page
        rendered = driver.find_elements("css selector", ".doc-function, .doc-class")  # (the API page, last)
        assert len(rendered) >= 8 and any("make_config" in e.text for e in rendered)
        driver.save_screenshot(str(tmp_path / "api.png"))
        assert (tmp_path / "api.png").stat().st_size > 10000
    finally:
        driver.quit()
