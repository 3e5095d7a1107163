"""Notebook 04's beam-width panel in a real browser (issue 29).

The panel's callbacks are tested without a browser in tests/test_widgets.py; this test checks
the part those tests cannot: that the sliders, the Output widget and the kernel are wired
together in a page. Voila serves notebook 04 (its own cells, the parameters injected by
papermill as `make demo` does) on 127.0.0.1, headless Chromium opens it through Selenium, the
test moves the beam-width slider with the keyboard and reads the table the panel shows, which
must change and match `captioning.widgets.beam_table` for that width on the same bundle and
photo. A screenshot of the page is saved under the test's tmp_path.

The browser is Debian's (`apt-get install chromium chromium-driver`, which `.ci/run` does when
it is missing); Selenium is pointed at /usr/bin/chromedriver, so nothing is downloaded. Without
them the test skips, unless CAPTIONING_BROWSER_REQUIRED=1 (set by `.ci/run`), then it fails.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAGE_TIMEOUT = 600  # seconds for voila to run the notebook's cells on 2 busy cores
STEP_TIMEOUT = 180  # seconds for one slider move to redraw the table


def _missing(reason):
    if os.environ.get("CAPTIONING_BROWSER_REQUIRED") == "1":
        pytest.fail(f"{reason}, but CAPTIONING_BROWSER_REQUIRED=1")
    pytest.skip(f"{reason}: install them (Debian: apt-get install chromium chromium-driver; "
                "`.ci/run` does) to run the browser test")


@pytest.fixture(scope="session")  # session: checked before the session's trained bundle is built
def browser_tools():
    """Debian's chromium and chromedriver, and the selenium and voila packages."""
    absent = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if absent:
        _missing(f"no browser for the panel test ({', '.join(absent)} missing)")
    for module in ("selenium", "voila"):
        try:
            __import__(module)
        except ImportError:
            _missing(f"the {module} package is not installed (requirements.txt)")


def panel_notebook(parameters, target):
    """Notebook 04 with only what its panel needs: the imports, the parameters, the loaded bundle,
    the photo of section 6 and the panel of section 7, each cell as the notebook has it; the
    parameters injected with papermill, as scripts/run_notebooks.py does."""
    import papermill

    source = REPO / "notebooks" / "04_decoding.ipynb"
    notebook = json.loads(source.read_text(encoding="utf-8"))
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]

    def cell(marker):
        [found] = [c for c in code if marker in "".join(c["source"])]
        return found

    keep = [code[0], next(c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])),
            cell("Captioner.load("), cell("photo = my_photo or"), cell("widgets.IntSlider(")]
    notebook["cells"] = keep
    target.parent.mkdir(parents=True, exist_ok=True)
    trimmed = target.parent.parent / f"trimmed-{target.name}"
    trimmed.write_text(json.dumps(notebook), encoding="utf-8")
    declared = papermill.inspect_notebook(str(trimmed))
    papermill.execute_notebook(str(trimmed), str(target), parameters={k: v for k, v in parameters.items() if k in declared},
                               prepare_only=True, kernel_name="python3", progress_bar=False)
    return target


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_the_beam_width_slider_redraws_the_table_in_a_browser(browser_tools, flickr8k_bundle, flickr8k_work_dir,
                                                                flickr8k_small_dir, mobilenet_weights, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from captioning import quiet_tensorflow
    quiet_tensorflow()
    from captioning.bundle import Captioner
    from captioning.fileio import work_paths
    from captioning.widgets import beam_table, photo_features

    # A work folder laid out as notebook 04 expects (work_paths), over what the suite's `train` run left.
    work = tmp_path / "work"
    for name, source in ((work_paths(work, "flickr8k")["prepared"], flickr8k_work_dir / "prepared" / "flickr8k"),
                         (work_paths(work, "flickr8k", "mobilenet_v2")["features"],
                          flickr8k_work_dir / "features" / "flickr8k-mobilenet_v2-avg"),
                         (work_paths(work, "flickr8k", "mobilenet_v2", arch="merge")["bundle"], flickr8k_bundle)):
        assert source.exists(), source
        name.parent.mkdir(parents=True, exist_ok=True)
        name.symlink_to(source)
    notebook = panel_notebook({"dataset": "flickr8k", "data_dir": str(flickr8k_small_dir), "work_dir": str(work),
                               "encoder": "mobilenet_v2", "weights": str(mobilenet_weights)},
                              tmp_path / "site" / "04_decoding.ipynb")

    port = free_port()
    environment = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    log = open(tmp_path / "voila.log", "w")
    voila = subprocess.Popen(
        [sys.executable, "-m", "voila", notebook.name, "--no-browser", "--Voila.ip=127.0.0.1", f"--Voila.port={port}",
         "--Voila.port_retries=0", "--VoilaConfiguration.show_tracebacks=True",
         f"--NotebookClient.timeout={PAGE_TIMEOUT}"],
        cwd=notebook.parent, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    driver = None
    screenshot = tmp_path / "notebook04-panel.png"
    try:
        def listening():
            if voila.poll() is not None:
                raise AssertionError(f"voila exited {voila.returncode}:\n{(tmp_path / 'voila.log').read_text()[-3000:]}")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, 120, f"voila to listen on 127.0.0.1:{port}")

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        driver.set_script_timeout(60)
        driver.get(f"http://127.0.0.1:{port}/")

        def slider():
            for widget in driver.find_elements(By.CSS_SELECTOR, ".widget-slider"):
                labels = widget.find_elements(By.CSS_SELECTOR, ".widget-label")
                if labels and labels[0].text.strip() == "beam width":
                    return widget
            if "Traceback" in driver.page_source or "Error" in driver.title:
                raise AssertionError(f"the notebook failed in voila:\n{driver.find_element(By.TAG_NAME, 'body').text[-3000:]}")
            return None

        def shown(width):
            """The panel's table once it shows `width`: the captions, the scores, and the line above it."""
            for area in driver.find_elements(By.CSS_SELECTOR, ".widget-output"):
                text = area.text
                if f"beam width {width}," not in text:
                    continue
                rows = area.find_elements(By.CSS_SELECTOR, "table.dataframe tbody tr")
                if len(rows) != width:
                    continue
                cells = [[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "td")] for row in rows]
                return text.splitlines()[0], [row[0] for row in cells], [float(row[3]) for row in cells]
            return None

        widget = wait_for(slider, PAGE_TIMEOUT, "the panel's beam-width slider")
        before = wait_for(lambda: shown(3), STEP_TIMEOUT, "the table for beam width 3")
        handle = widget.find_element(By.CSS_SELECTOR, ".noUi-handle")
        handle.click()
        handle.send_keys(Keys.ARROW_RIGHT)
        after = wait_for(lambda: shown(4), STEP_TIMEOUT, "the table to redraw for beam width 4")
        assert widget.find_element(By.CSS_SELECTOR, ".widget-readout").text.strip() == "4"
        driver.save_screenshot(str(screenshot))
        print(f"screenshot of notebook 04's panel: {screenshot}")

        # What the page shows is what the package computes for that width, on the same bundle and photo.
        name = before[0].split(":")[0]
        captioner = Captioner.load(flickr8k_bundle)
        alpha = captioner.settings["decoding"]["length_alpha"]
        assert after[0] == f"{name}: beam width 4, α = {alpha:.1f}"
        features = photo_features(captioner, flickr8k_small_dir / "images" / name, weights=mobilenet_weights)
        for (_, captions, scores), width in ((before, 3), (after, 4)):
            expected = beam_table(captioner, features, width, alpha).round(3)
            assert captions == list(expected["caption"])
            assert scores == pytest.approx(list(expected["score"]), abs=2e-3)
        assert (before[1], before[2]) != (after[1], after[2])  # the table changed with the slider
    finally:
        if driver is not None and not screenshot.exists():
            try:
                driver.save_screenshot(str(screenshot))
                print(f"screenshot (at the failure): {screenshot}")
            except Exception:  # noqa: BLE001 - a failed screenshot must not hide the failure
                pass
        if driver is not None:
            driver.quit()
        try:
            os.killpg(voila.pid, signal.SIGTERM)
            voila.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(voila.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            voila.wait(timeout=30)
        log.close()
