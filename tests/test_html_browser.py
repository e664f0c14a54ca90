"""The report page (index.html) in a real browser: headless Chromium driven by Selenium.

The page is opened from the file system (file://, no server) and must list every input, sort,
filter, paginate, show the contact sheet in its viewer, keep working when the run's folder is
moved, run no injected script, and log no console error.

Needs Chromium and its driver from the system's packages (Debian: ``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them when missing) and selenium (the ``test`` extra).
Without them the tests are skipped with the reason. ``AUGNET_CHROMIUM`` / ``AUGNET_CHROMEDRIVER``
point to other executables; ``AUGNET_SCREENSHOTS=DIR`` keeps the screenshots taken here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from report_data import default_name, make_run, write_summary

from augnet._html import write_index_html

CHROMIUM = os.environ.get("AUGNET_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("AUGNET_CHROMEDRIVER", "/usr/bin/chromedriver")
# the machine has no network: without these flags Chromium tries to connect out
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)
N = 130  # inputs of the test run: three pages of 50
XSS_NAMES = ('"><img src=x onerror=window.__xss=1>', "<svg onload=window.__xss=2>")
SCRIPT_INPUT = "<script>alert(1)</script>.png"  # a real path: folder '<script>alert(1)<'


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for exe, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            return f"{exe} is missing (apt-get install {package}; .ci/run installs it)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="augnet-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.set_script_timeout(60)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_console_errors(request):
    """Every test ends with no error in the browser's console (and no alert open)."""
    if "driver" not in request.fixturenames:
        yield
        return
    d = request.getfixturevalue("driver")
    d.get_log("browser")  # drop what earlier tests left
    yield
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        d.switch_to.alert.text  # noqa: B018
    errors = [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder of N inputs (real pictures), two with names that are HTML, and its page."""
    root = tmp_path_factory.mktemp("report")
    out = root / "run"

    def name(i: int) -> str:
        return XSS_NAMES[i - 7] if i in (7, 8) else default_name(i)

    entries = make_run(out, N, k=3, n_outputs=10, names=name)
    # an input whose path holds a <script> element (a folder named '<script>alert(1)<')
    script_dir = root / "inputs" / "<script>alert(1)<"
    script_dir.mkdir()
    shutil.copy(entries[0]["input"], script_dir / "script>.png")
    shutil.copytree(out / entries[0]["name"], out / "xss_script")
    extra = dict(
        entries[0], input=str(script_dir / "script>.png"), name="<script>alert(1)</script>"
    )
    extra["files"] = [f.replace(entries[0]["name"], "xss_script", 1) for f in entries[0]["files"]]
    extra["predictions"] = [0.5, 0.3, 0.2]
    entries.append(extra)
    assert extra["input"].endswith(SCRIPT_INPUT)
    write_summary(out, entries)
    (out / "run.json").write_text(
        json.dumps(
            {
                "settings": {
                    "model": {"path": "/models/classifier.keras"},
                    "top_k": 3,
                    "input_shape": [48, 48, 3],
                    "mode": "signed",
                },
                "resolved": {"strategy": "loop"},
            }
        )
    )
    write_index_html(out, total=len(entries) + 20)
    return out, entries


def load(driver, page: Path) -> None:
    driver.get(page.as_uri())
    driver.execute_async_script(
        "const done = arguments[0];"
        "(function wait() { document.body && document.body.dataset.ready ? done() :"
        " setTimeout(wait, 10); })();"
    )


def shown(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#rows tr[data-input]'))"
        ".map(tr => tr.dataset.input)"
    )


def text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def wait_for(driver, condition, timeout=10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def select(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def click(driver, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, element_id).click()


def r6(v: float) -> float:
    return float(f"{v:.6g}")


def expected_order(entries, key, descending=True) -> list[str]:
    """Inputs sorted as the page sorts: by the 6-digit key, ties in run order, NaN last."""
    indexed = list(enumerate(entries))
    finite = [(i, e) for i, e in indexed if not math.isnan(key(e))]
    finite.sort(key=lambda ie: ((-1 if descending else 1) * key(ie[1]), ie[0]))
    return [e["input"] for _, e in finite]


# --------------------------------------------------------------------------------------------


def test_lists_every_input_page_by_page(driver, run):
    out, entries = run
    load(driver, out / "index.html")
    assert driver.execute_script("return augnetReport.rows") == len(entries)
    pages = math.ceil(len(entries) / 50)
    assert text(driver, "pages") == f"of {pages}"
    seen = []
    for p in range(pages):
        rows = shown(driver)
        assert len(rows) == min(50, len(entries) - 50 * p)
        assert text(driver, "count") == f"{50 * p + 1}–{50 * p + len(rows)} of {len(entries)}"
        seen += rows
        if p < pages - 1:
            click(driver, "next")
    assert driver.find_element("id", "next").get_attribute("disabled") is not None
    assert seen == [e["input"] for e in entries]  # every input once, in run order
    # the header shows the run's facts and its progress
    facts = text(driver, "facts")
    assert "classifier.keras" in facts and "top 3 per input" in facts and "loop" in facts
    assert text(driver, "progress-label").startswith(f"{len(entries)} of {len(entries) + 20}")


def test_sorts_by_prediction_norm_and_name(driver, run):
    out, entries = run
    load(driver, out / "index.html")
    top = lambda e: r6(max(e["predictions"]))  # noqa: E731
    norm = lambda e: r6(math.sqrt(math.fsum(v * v for v in e["jacobian_l2"])))  # noqa: E731
    select(driver, "sort", "pred")
    assert shown(driver) == expected_order(entries, top)[:50]
    click(driver, "dir")  # ascending
    assert shown(driver) == expected_order(entries, top, descending=False)[:50]
    # the column headers sort too; a second click turns the order around
    driver.find_element("css selector", "th[data-sort=norm]").click()
    assert shown(driver) == expected_order(entries, norm)[:50]
    driver.find_element("css selector", "th[data-sort=norm]").click()
    assert shown(driver) == expected_order(entries, norm, descending=False)[:50]
    click(driver, "last")
    assert shown(driver) == expected_order(entries, norm, descending=False)[100:]
    select(driver, "sort", "name")
    names = driver.execute_script(
        "return Array.from(document.querySelectorAll('#rows .name')).map(e => e.textContent)"
    )
    assert len(names) == 50
    # the page uses the browser's collation (numeric, case-insensitive); check it is ordered so
    collated = driver.execute_script(
        "const c = new Intl.Collator(undefined, {numeric: true, sensitivity: 'base'});"
        "const n = arguments[0]; return n.every((x, i) => i === 0 || c.compare(n[i-1], x) <= 0);",
        names,
    )
    assert collated


def test_filters_by_name_and_by_output(driver, run):
    out, entries = run
    load(driver, out / "index.html")
    q = driver.find_element("id", "q")
    q.send_keys("DOG_000")  # case-insensitive, matches the name or the path
    dogs = [e["input"] for e in entries if "dog_000" in (e["name"] + "\n" + e["input"]).lower()]
    assert 0 < len(dogs) < 50
    wait_for(driver, lambda: shown(driver) == dogs)
    assert text(driver, "count") == f"1–{len(dogs)} of {len(dogs)} (of {len(entries)})"
    q.clear()
    q.send_keys("no such input")
    wait_for(driver, lambda: text(driver, "count") == f"0 of {len(entries)}")
    assert "No input matches" in text(driver, "rows")
    q.clear()
    q.send_keys("cat 0001")  # every word must match
    both = [
        e["input"]
        for e in entries
        if all(w in (e["name"] + "\n" + e["input"]).lower() for w in ("cat", "0001"))
    ]
    assert 0 < len(both) < len(dogs)
    wait_for(driver, lambda: shown(driver) == both)
    q.clear()
    q.send_keys(" ")
    wait_for(driver, lambda: len(shown(driver)) == 50)
    # one output: the inputs for which it was computed, by its prediction
    select(driver, "out", "4")
    with_4 = [e for e in entries if 4 in e["outputs"]]

    def pred4(e):
        return r6(e["predictions"][e["outputs"].index(4)])

    assert driver.find_element("id", "sort").get_attribute("value") == "pred"
    assert shown(driver) == expected_order(with_4, pred4)[:50]
    assert text(driver, "count").endswith(f"of {len(with_4)} (of {len(entries)})")
    first = driver.find_element("css selector", "#rows tr .pred .k")
    assert first.text == "out 4" and "hl" in first.get_attribute("class")


def test_paginates(driver, run):
    out, entries = run
    load(driver, out / "index.html")
    select(driver, "size", "25")
    pages = math.ceil(len(entries) / 25)
    assert text(driver, "pages") == f"of {pages}"
    page = driver.find_element("id", "page")
    page.clear()
    page.send_keys("3\n")
    wait_for(driver, lambda: shown(driver) == [e["input"] for e in entries[50:75]])
    click(driver, "last")
    assert shown(driver) == [e["input"] for e in entries[25 * (pages - 1) :]]
    click(driver, "prev")
    assert shown(driver) == [e["input"] for e in entries[25 * (pages - 2) : 25 * (pages - 1)]]
    click(driver, "first")
    assert shown(driver) == [e["input"] for e in entries[:25]]
    assert driver.find_element("id", "prev").get_attribute("disabled") is not None


def test_only_the_visible_page_has_images_and_they_load(driver, run):
    out, entries = run
    load(driver, out / "index.html")
    info = driver.execute_script(
        "const imgs = Array.from(document.querySelectorAll('#rows img'));"
        "return [imgs.length, imgs.every(i => i.loading === 'lazy'),"
        " Array.from(document.images).filter(i => i.closest('#rows') === null && i.src).length]"
    )
    assert info[0] == 50 * (1 + 3)  # a thumbnail and three maps per row, for 50 rows only
    assert info[1] and info[2] == 0  # the viewer's image is not loaded until asked for
    # the pictures in view load: the first row's thumbnail (the input image) and its maps
    wait_for(
        driver,
        lambda: driver.execute_script(
            "return Array.from(document.querySelectorAll('#rows tr:first-child img'))"
            ".every(i => i.complete && i.naturalWidth > 0)"
        ),
    )


def test_contact_sheet_viewer(driver, run):
    out, entries = run
    load(driver, out / "index.html")
    buttons = driver.find_elements("css selector", "#rows td.sheet button")
    assert len(buttons) == 50
    buttons[1].click()
    assert driver.find_element("id", "lightbox").is_displayed()

    def image():
        return driver.execute_script(
            "const i = document.getElementById('lb-img');"
            "return [i.getAttribute('src'), i.complete && i.naturalWidth > 0]"
        )

    wait_for(driver, lambda: image()[1])
    assert image()[0] == f"{entries[1]['name']}/contact_sheet.png"
    assert (out / image()[0]).is_file()
    assert entries[1]["name"] in text(driver, "lb-caption")
    from selenium.webdriver.common.keys import Keys

    body = driver.find_element("tag name", "body")
    body.send_keys(Keys.ARROW_RIGHT)
    assert image()[0] == f"{entries[2]['name']}/contact_sheet.png"
    body.send_keys(Keys.ESCAPE)
    assert not driver.find_element("id", "lightbox").is_displayed()
    # a map opens in the viewer too
    driver.find_element("css selector", "#rows tr:first-child figure.map").click()
    wait_for(driver, lambda: image()[1])
    assert "/output_" in image()[0]
    click(driver, "lb-close")
    assert not driver.find_element("id", "lightbox").is_displayed()


def test_names_are_shown_as_text_and_never_run(driver, run):
    out, entries = run
    load(driver, out / "index.html")
    q = driver.find_element("id", "q")
    q.send_keys("<")
    html_named = [e for e in entries if "<" in e["name"] + e["input"]]
    assert len(html_named) == 3
    wait_for(driver, lambda: shown(driver) == [e["input"] for e in html_named])
    names = driver.execute_script(
        "return Array.from(document.querySelectorAll('#rows .name')).map(e => e.textContent)"
    )
    paths = driver.execute_script(
        "return Array.from(document.querySelectorAll('#rows .path')).map(e => e.textContent)"
    )
    assert names == [e["name"] for e in html_named]
    assert paths == [e["input"] for e in html_named]
    assert paths[-1].endswith(SCRIPT_INPUT)
    assert driver.execute_script("return window.__xss === undefined")
    # the markup in the names made no element
    assert (
        driver.execute_script(
            "return document.querySelectorAll('#rows script, #rows svg, #rows img[src=x]').length"
        )
        == 0
    )
    # the input whose path holds <script> still shows its picture
    wait_for(
        driver,
        lambda: driver.execute_script(
            "const tr = document.querySelectorAll('#rows tr')[2];"
            "const i = tr.querySelector('.thumbbox img'); return i.complete && i.naturalWidth > 0"
        ),
    )


def test_view_survives_a_reload_and_new_results_appear(driver, run, tmp_path):
    out, entries = run
    # a running job: the page is rewritten after each batch and the user reloads
    live = tmp_path / "live"
    shutil.copytree(out, live, ignore=shutil.ignore_patterns("index.html", "index_files"))
    write_summary(live, entries[:40])
    write_index_html(live, total=len(entries))
    load(driver, live / "index.html")
    assert driver.execute_script("return augnetReport.rows") == 40
    assert text(driver, "progress-label").startswith(f"40 of {len(entries)} inputs finished")
    select(driver, "sort", "norm")
    driver.find_element("id", "q").send_keys("owl")
    wait_for(driver, lambda: "owl" in driver.current_url)
    before = shown(driver)
    write_summary(live, entries[40:], mode="a")
    write_index_html(live, total=len(entries))
    driver.refresh()
    driver.execute_async_script(
        "const done = arguments[0];"
        "(function wait() { document.body && document.body.dataset.ready ? done() :"
        " setTimeout(wait, 10); })();"
    )
    assert driver.execute_script("return augnetReport.rows") == len(entries)
    assert driver.find_element("id", "q").get_attribute("value") == "owl"
    assert driver.find_element("id", "sort").get_attribute("value") == "norm"
    after = shown(driver)
    assert len(after) > len(before) and set(before) <= set(after)
    assert text(driver, "progress-label") == f"all {len(entries)} inputs finished"


def test_moved_folder_still_shows_its_pictures(driver, run, tmp_path):
    out, entries = run
    moved = tmp_path / "somewhere" / "else"
    shutil.copytree(out, moved)  # copied: the module's other tests keep the original
    load(driver, moved / "index.html")
    assert driver.execute_script("return augnetReport.rows") == len(entries)
    srcs = driver.execute_script(
        "return Array.from(document.querySelectorAll('#rows tr:first-child figure img'))"
        ".map(i => i.src)"
    )
    assert srcs and all(s.startswith(moved.as_uri() + "/") for s in srcs)
    wait_for(
        driver,
        lambda: driver.execute_script(
            "return Array.from(document.querySelectorAll('#rows tr:first-child img'))"
            ".every(i => i.complete && i.naturalWidth > 0)"
        ),
    )


def test_recomputed_input_is_listed_once(driver, run, tmp_path):
    out, entries = run
    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("index.html", "index_files"))
    redo = dict(entries[5], predictions=[0.99, 0.005, 0.005])
    write_summary(again, [redo], mode="a")
    write_index_html(again)
    load(driver, again / "index.html")
    assert driver.execute_script("return augnetReport.rows") == len(entries)
    select(driver, "sort", "pred")
    assert shown(driver)[0] == entries[5]["input"]
    assert driver.find_element("css selector", "#rows tr:first-child .pred .v").text == "0.99"


def test_empty_run(driver, tmp_path):
    write_index_html(tmp_path, total=100)
    load(driver, tmp_path / "index.html")
    assert "No finished inputs yet" in text(driver, "rows")
    assert text(driver, "progress-label").startswith("0 of 100")


def test_screenshot(driver, run, tmp_path):
    from PIL import Image

    out, entries = run
    load(driver, out / "index.html")
    select(driver, "sort", "pred")
    wait_for(
        driver,
        lambda: driver.execute_script(
            "return Array.from(document.querySelectorAll('#rows tr:nth-child(-n+4) img'))"
            ".every(i => i.complete && i.naturalWidth > 0)"
        ),
    )
    path = tmp_path / "report.png"
    assert driver.save_screenshot(str(path))
    keep = os.environ.get("AUGNET_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / "report.png")
    image = Image.open(path).convert("RGB")
    assert image.size[0] >= 1200
    colours = image.resize((350, 250)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 500  # pictures, not a blank page
    buttons = driver.find_elements("css selector", "#rows td.sheet button")
    buttons[0].click()
    wait_for(
        driver,
        lambda: driver.execute_script(
            "const i = document.getElementById('lb-img'); return i.complete && i.naturalWidth > 0"
        ),
    )
    if keep:
        driver.save_screenshot(str(Path(keep) / "report_viewer.png"))


# --------------------------------------------------------------------------------------------
# The page of a real run, written by the runner (issue 11: index.html in every data-set run)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A run folder written by ``augnet jacobian`` itself: a tiny RGB classifier (top 3 of 6
    outputs), 60 images in batches of 16, pictures, contact sheets and thumbnails."""
    import keras
    import numpy as np
    from PIL import Image

    from augnet import _runner

    root = tmp_path_factory.mktemp("real")
    keras.utils.set_random_seed(3)
    inp = keras.Input((24, 24, 3))
    h = keras.layers.Conv2D(4, 3, activation="tanh")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = root / "classifier.keras"
    keras.Model(inp, keras.layers.Dense(6, activation="softmax")(h)).save(model)
    images = root / "photos"
    images.mkdir()
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(60):  # smooth coloured blobs, so the thumbnails are pictures, not noise
        cy, cx, r = rng.uniform(6, 26), rng.uniform(6, 26), rng.uniform(4, 12)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        colour = rng.uniform(0, 255, 3)
        pixels = (blob * colour + (1 - blob) * rng.uniform(0, 80, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{ANIMALS_REAL[i % 3]}_{i:03d}.png")
    out = root / "results"
    options = _runner.RunOptions(
        model=str(model),
        inputs=(str(images),),
        out=str(out),
        top_k=3,
        batch_size=16,
        strategy="loop",
    )
    _runner.run(options, quiet=True)
    entries = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    return out, images, entries


ANIMALS_REAL = ("cat", "dog", "owl")


def test_the_page_of_a_real_run(driver, real_run, tmp_path):
    """Every input listed with its own thumbnail (written by the run, inside the folder, so the
    page still shows it when the folder has moved and the inputs are gone), its maps and its
    contact sheet; sorted by the Jacobian norm of summary.jsonl; searchable."""
    out, images, entries = real_run
    moved = tmp_path / "elsewhere" / "results"
    shutil.copytree(out, moved)
    hidden = images.with_name("photos-away")
    images.rename(hidden)  # the inputs are gone: the page must not need them
    try:
        load(driver, moved / "index.html")
        assert driver.execute_script("return augnetReport.rows") == 60
        assert shown(driver) == [e["input"] for e in entries[:50]]
        assert text(driver, "progress-label") == "all 60 inputs finished"
        facts = text(driver, "facts")
        assert "classifier.keras" in facts and "top 3 per input" in facts
        thumbs = driver.execute_script(
            "return Array.from(document.querySelectorAll('#rows .thumbbox img'))"
            ".map(i => i.getAttribute('src'))"
        )
        assert thumbs == [f"{e['name']}/thumbnail.png" for e in entries[:50]]
        wait_for(
            driver,
            lambda: driver.execute_script(
                "return Array.from(document.querySelectorAll('#rows tr:nth-child(-n+6) img'))"
                ".every(i => i.complete && i.naturalWidth > 0)"
            ),
        )
        norm = lambda e: r6(math.sqrt(math.fsum(v * v for v in e["jacobian_l2"])))  # noqa: E731
        select(driver, "sort", "norm")
        assert shown(driver) == expected_order(entries, norm)[:50]
        driver.find_element("id", "q").send_keys("owl")
        owls = [e["input"] for e in entries if "owl" in e["input"]]
        wait_for(driver, lambda: sorted(shown(driver)) == sorted(owls))
        driver.find_elements("css selector", "#rows td.sheet button")[0].click()
        wait_for(
            driver,
            lambda: driver.execute_script(
                "const i = document.getElementById('lb-img');"
                " return i.complete && i.naturalWidth > 0 && i.src.endsWith('contact_sheet.png')"
            ),
        )
        keep = os.environ.get("AUGNET_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(Path(keep) / "real_run_viewer.png"))
            driver.find_element("id", "lb-close").click()
            load(driver, moved / "index.html")  # the default view: run order, every input
            wait_for(
                driver,
                lambda: driver.execute_script(
                    "return Array.from(document.querySelectorAll('#rows tr:nth-child(-n+6) img'))"
                    ".every(i => i.complete && i.naturalWidth > 0)"
                ),
            )
            driver.save_screenshot(str(Path(keep) / "real_run.png"))
    finally:
        hidden.rename(images)
