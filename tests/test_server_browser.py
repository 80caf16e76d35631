"""The web page at / in a real browser: Debian's chromium (headless) + chromium-driver, driven by selenium,
against a real uvicorn with the bundled model. Saves a screenshot under the test's tmp dir."""
from __future__ import annotations

import io
import os
import shutil

import pytest

REASON = "the browser test needs the server extras: pip install '.[server-test]'"
pytest.importorskip("starlette", reason=REASON)
pytest.importorskip("uvicorn", reason=REASON)
pytest.importorskip("selenium", reason=REASON)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.server_util import LiveServer, bundled_manager  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
WAIT = 90  # seconds: bounds on waiting for the page, never asserted timings

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not installed "
                                "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)")

# Records every value the progress bars of #jobs take (set on the page before a job starts).
RECORD_PROGRESS = """
window.__progress = [];
new MutationObserver((muts) => {
  for (const m of muts) {
    if (m.type === 'attributes' && m.target.tagName === 'PROGRESS' && m.attributeName === 'value') {
      window.__progress.push([m.target.closest('.job').dataset.jobId, Number(m.target.getAttribute('value')),
                              Number(m.target.getAttribute('max'))]);
    }
  }
}).observe(document.getElementById('jobs'), {subtree: true, attributes: true, attributeFilter: ['value', 'max']});
"""


@pytest.fixture()
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_web_page_generates_with_live_progress_and_cancels(browser, tmp_path):
    # 10 ms per model call: the 120-step job takes over a second, so its progress is seen moving, and the
    # 1000-step one runs long enough to be cancelled, however fast the machine
    server = LiveServer(bundled_manager(step_delay=0.01)).start()
    wait = WebDriverWait(browser, WAIT, poll_frequency=0.05)
    try:
        browser.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        assert "digits" in browser.find_element(By.ID, "model-info").text

        # pick a class by typing its name
        browser.find_element(By.ID, "class-search").send_keys("7")
        options = browser.find_elements(By.CSS_SELECTOR, "#class-list .class-option")
        assert [o.text for o in options] == ["7 (7)"]
        options[0].click()
        assert browser.find_element(By.ID, "class-selected").text == "7 (7)"

        # generate: the progress bar moves, a preview shows, the image lands in the gallery with its parameters
        for field, value in (("steps", "120"), ("seed", "42")):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        browser.execute_script(RECORD_PROGRESS)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#gallery figure img'); return i && i.complete && i.naturalWidth > 0"))
        first_job = browser.find_element(By.CSS_SELECTOR, "#jobs .job").get_attribute("data-job-id")
        values = [v for job, v, _ in browser.execute_script("return window.__progress") if job == first_job]
        assert len(set(values)) >= 3 and values == sorted(values) and values[-1] == 120, values
        card = browser.find_element(By.ID, f"job-{first_job}")
        assert card.find_element(By.CLASS_NAME, "status").text == "done"
        assert card.find_element(By.CLASS_NAME, "preview").get_attribute("src").startswith("data:image/png;base64,")
        caption = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
        assert "7" in caption and "seed 42" in caption and "120 steps" in caption
        link = browser.find_element(By.CSS_SELECTOR, "#gallery a.download")
        assert link.get_attribute("href").startswith("blob:") and link.get_attribute("download").endswith("-0.png")

        # a second, long job: cancel it while it runs
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("1000")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#jobs .job").get_attribute("data-job-id") != first_job)
        second = browser.find_element(By.CSS_SELECTOR, "#jobs .job")
        wait.until(lambda d: "running: step" in second.find_element(By.CLASS_NAME, "status").text)
        second.find_element(By.CLASS_NAME, "cancel").click()
        wait.until(lambda d: "cancelled" in second.find_element(By.CLASS_NAME, "status").text)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 1
        job_id = second.get_attribute("data-job-id")
        assert server.manager.get(job_id).status == "cancelled"
        assert server.manager.get(job_id).stopped_at_step < 1000
    finally:
        shot = tmp_path / "server-page.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        art = os.environ.get("TERDIT_ARTIFACTS")
        if art:
            os.makedirs(art, exist_ok=True)
            shutil.copy(shot, os.path.join(art, "server-page.png"))
        server.stop()
    assert shot.stat().st_size > 1000


def test_web_page_edit_mode_uploads_paints_a_mask_and_edits(browser, tmp_path):
    """Edit mode on the bundled digits model: upload a '3', brush over its left part, pick class 8 and a
    strength, submit; the progress runs to the job's steps and the result equals the Python API's
    inpainting of what the page sent; then the same picture without a mask (image-to-image)."""
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains

    from terdit_edge.edit import EditSettings
    from terdit_edge.pipeline import Pipeline, to_uint8
    from tests.test_edit import a_three

    src = tmp_path / "three.png"
    Image.fromarray(a_three()).save(src)
    server = LiveServer(bundled_manager(step_delay=0.01)).start()
    wait = WebDriverWait(browser, WAIT, poll_frequency=0.05)
    try:
        browser.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        assert browser.find_element(By.ID, "edit-panel").get_attribute("hidden") is not None
        browser.find_element(By.ID, "mode-edit").click()
        assert browser.find_element(By.ID, "generate").text == "Edit"
        browser.find_element(By.ID, "edit-file").send_keys(str(src))
        wait.until(lambda d: d.execute_script("return document.getElementById('edit-canvas').width") == 16)
        assert "no mask" in browser.find_element(By.ID, "mask-state").text

        # brush a stroke down the left part of the picture (the canvas shows it 256 px wide: 16 px per pixel)
        canvas = browser.find_element(By.ID, "edit-canvas")
        brush = browser.find_element(By.ID, "brush")
        brush.clear()
        brush.send_keys("4")
        (ActionChains(browser).move_to_element_with_offset(canvas, -100, -110).click_and_hold()
         .move_by_offset(0, 100).move_by_offset(0, 110).release().perform())
        assert "mask painted" in browser.find_element(By.ID, "mask-state").text

        browser.find_element(By.ID, "class-search").send_keys("8")
        browser.find_elements(By.CSS_SELECTOR, "#class-list .class-option")[0].click()
        for field, value in (("steps", "40"), ("seed", "5")):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        browser.execute_script("const s = document.getElementById('strength'); s.value = '0.8';"
                               "s.dispatchEvent(new Event('input'));")
        assert browser.find_element(By.ID, "strength-value").text == "0.8"
        browser.execute_script(RECORD_PROGRESS)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#gallery figure img'); return i && i.complete && i.naturalWidth > 0"))
        job_id = browser.find_element(By.CSS_SELECTOR, "#jobs .job").get_attribute("data-job-id")
        job = server.manager.get(job_id)
        assert job.status == "succeeded" and job.params.edit is not None and job.params.edit.has_mask
        values = [v for j, v, _ in browser.execute_script("return window.__progress") if j == job_id]
        assert values == sorted(values) and values[-1] == job.total_steps == 32, values  # round(0.8 * 40) steps
        caption = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
        assert "inpainting strength 0.8" in caption and "seed 5" in caption

        # what the page sent: the picture itself, and a mask white on the stroke, black on the right
        picture = np.asarray(Image.open(io.BytesIO(job.params.edit.image)))
        mask = np.asarray(Image.open(io.BytesIO(job.params.edit.mask)))
        assert np.array_equal(picture, a_three())
        assert mask[2:14, 1:3].min() == 255 and mask[:, 8:].max() == 0
        es = job.params.edit.settings
        assert es.strength == 0.8 and es == EditSettings(strength=0.8).for_mask(True)
        pipe = Pipeline.load()
        want = pipe.inpaint(job.params.edit.image, job.params.edit.mask, [8], seeds=[5], steps=40, sampler="ddim",
                            output="np", **es.edit_kwargs(True))
        got = np.asarray(Image.open(io.BytesIO(job.images[0])))
        assert np.array_equal(got, to_uint8(want)[0, :, :, 0])
        assert np.array_equal(got[:, 11:], a_three()[:, 11:])  # the unpainted right part is kept

        # clear the mask: the same picture, edited as a whole (image-to-image)
        browser.find_element(By.ID, "mask-clear").click()
        assert "no mask" in browser.find_element(By.ID, "mask-state").text
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure img")) == 2)
        second = browser.find_element(By.CSS_SELECTOR, "#jobs .job").get_attribute("data-job-id")
        assert second != job_id
        job2 = server.manager.get(second)
        assert job2.status == "succeeded" and job2.params.edit is not None and job2.params.edit.mask is None
        assert "image-to-image strength 0.8" in browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    finally:
        shot = tmp_path / "server-page-edit.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        art = os.environ.get("TERDIT_ARTIFACTS")
        if art:
            os.makedirs(art, exist_ok=True)
            shutil.copy(shot, os.path.join(art, "server-page-edit.png"))
        server.stop()
    assert shot.stat().st_size > 1000
