"""The web dashboard in a real headless Chromium, against a real `alexnet-dist server` and Redis.

Jobs are made in the store as the dispatcher would leave them, and their events published with the
publisher training uses, with the fields training publishes; the browser sees them only through the
server. Screenshots go to each test's tmp_path, and also to the folder ``ALEXNET_DIST_SCREENSHOTS`` names
(``docs/dashboard-queue.png``, ``docs/dashboard-job.png`` come from there).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apiserver import ApiServer
from jobspecs import cpu_spec
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from alexnet_dist.api.auth import COOKIE
from alexnet_dist.service.events import job_publisher
from alexnet_dist.service.store import JobRecord, JobState

pytestmark = pytest.mark.slow  # a server and a browser to start: about 20 s

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DESKTOP = (1280, 900)
PHONE = (390, 844)
WAIT_S = 15.0
EPOCHS = 6
STEPS = 50  # steps per epoch
LOG_EVERY = 10


# -- the browser --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            f"{CHROMIUM} or {CHROMEDRIVER} missing: run `make setup` (Debian's chromium, chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def driver(browser: WebDriver, api: ApiServer) -> Iterator[WebDriver]:
    """The module's browser, logged out, at desktop size; it leaves the page afterwards, closing its
    event stream and its polling."""
    browser.get(api.url + "/login")
    browser.delete_all_cookies()
    browser.set_window_size(*DESKTOP)
    yield browser
    browser.get("about:blank")


def wait(driver: WebDriver, until: Callable[[WebDriver], Any], what: str) -> Any:
    return WebDriverWait(driver, WAIT_S).until(until, message=f"waited {WAIT_S} s for {what}")


def text_of(driver: WebDriver, element_id: str) -> str:
    return driver.execute_script(
        f"const n = document.getElementById('{element_id}'); return n && n.textContent"
    )


def points(driver: WebDriver, series: str) -> int:
    """How many points a curve of the job page has (its polyline's data-points; -1 before it is drawn)."""
    found = f"document.querySelector('polyline[data-series=\"{series}\"]')"
    value = driver.execute_script(f"const n = {found}; return n && n.dataset.points")
    return int(value) if value is not None else -1


def log_in(driver: WebDriver, api: ApiServer, token: str) -> None:
    driver.get(api.url + "/login")
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, 'form[action="/login"] button[type="submit"]').click()
    wait(driver, lambda d: d.current_url == api.url + "/", "the queue after logging in")


def assert_no_sideways_scroll(driver: WebDriver) -> None:
    """The page is no wider than the phone's screen (wide tables scroll inside their own box)."""
    scroll, client = driver.execute_script(
        "const e = document.documentElement; return [e.scrollWidth, e.clientWidth]"
    )
    assert client <= PHONE[0] and scroll <= client + 1, f"the page scrolls sideways: {scroll} > {client}"


def screenshot(driver: WebDriver, tmp_path: Path, name: str, *, docs: bool = False) -> None:
    """The whole page (the window grown to its height) into tmp_path; with ``docs``, also into the folder
    ALEXNET_DIST_SCREENSHOTS names, when it is set."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    full, chrome = driver.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    driver.set_window_size(width, max(height, full + chrome))
    try:
        path = tmp_path / name
        assert driver.save_screenshot(str(path)), f"no screenshot {path}"
        folder = os.environ.get("ALEXNET_DIST_SCREENSHOTS")
        if docs and folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(folder) / name)
    finally:
        driver.set_window_size(width, height)


# -- jobs and their events, as the service and training make them -----------------------------------------


def submit(api: ApiServer, user: str, team: str, name: str = "alexnet") -> JobRecord:
    spec = cpu_spec("s3://data/train", "s3://data/val", "s3://ckpt", name=name, train__epochs=EPOCHS)
    rec, created = api.store.submit(spec, user=user, team=team)
    assert created
    return rec


def running(
    api: ApiServer, user: str, team: str, name: str = "alexnet", message: str = "running"
) -> JobRecord:
    """A job the dispatcher launched: QUEUED -> LAUNCHING -> RUNNING."""
    store = api.store
    rec = submit(api, user, team, name)
    assert store.transition(rec, JobState.LAUNCHING, message="launching")
    rec = store.get(rec.id)
    assert store.transition(rec, JobState.RUNNING, message=message, fields={"started": time.time()})
    return store.get(rec.id)


def lr_at(epoch: float) -> float:
    return 0.02 * 0.5 * (1 + math.cos(math.pi * epoch / EPOCHS))  # the spec's cosine schedule


def step_event(epoch: int, step: int) -> dict[str, Any]:
    """A ``step`` event with the fields training/loop.py's train_epoch publishes."""
    t = epoch - 1 + step / STEPS
    return {
        "type": "step",
        "epoch": epoch,
        "epochs": EPOCHS,
        "step": step,
        "steps_per_epoch": STEPS,
        "loss": 2.3 * math.exp(-t / 2.5) + 0.35 + 0.05 * math.sin(7 * t),
        "lr": lr_at(t),
        "images_per_s": 1234.5 + epoch,
    }


def epoch_event(epoch: int) -> dict[str, Any]:
    """An ``epoch`` event with the fields training/loop.py's end_epoch publishes."""
    return {
        "type": "epoch",
        "epoch": epoch,
        "epochs": EPOCHS,
        "lr": lr_at(epoch),
        "val_top1_error": 0.25 + 0.6 * math.exp(-epoch / 1.8),
        "val_top5_error": 0.04 + 0.35 * math.exp(-epoch / 1.5),
        "val_samples": 10_000,
        "train_loss": 2.3 * math.exp(-epoch / 2.5) + 0.35,
        "images_per_s": 1230.0,
        "seconds": 48.6,
        "train_seconds": 48.6 * epoch,
    }


def final_event(model_url: str) -> dict[str, Any]:
    """The ``final`` event training/loop.py's finish publishes."""
    return {
        "type": "final",
        "top1_error": 0.2631,
        "top5_error": 0.0512,
        "ten_crop": True,
        "val_samples": 10_000,
        "val_top1_error": 0.2702,
        "val_top5_error": 0.0544,
        "epochs": EPOCHS,
        "steps": EPOCHS * STEPS,
        "train_seconds": 291.6,
        "images_per_s": 1230.0,
        "model_url": model_url,
    }


def publish(api: ApiServer, job_id: str, *events: dict[str, Any]) -> None:
    publisher = job_publisher(api.redis_url, api.store.keys, job_id)
    try:
        for event in events:
            publisher.publish(event)
    finally:
        publisher.close()
    assert publisher.dropped == 0, "events were not published"


def epochs_of(first: int, last: int) -> list[dict[str, Any]]:
    """Every event of epochs ``first``..``last``: the logged steps, then the epoch's summary."""
    out: list[dict[str, Any]] = []
    for epoch in range(first, last + 1):
        out += [step_event(epoch, s) for s in range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
        out.append(epoch_event(epoch))
    return out


def http(api: ApiServer, token: str | None = None, **headers: str) -> httpx.Client:
    """A client of the server with the dashboard's cookie (when ``token``), following no redirects."""
    cookies = {COOKIE: token} if token else None
    return httpx.Client(base_url=api.url, cookies=cookies, headers=headers, timeout=10.0)


def page_csrf(client: httpx.Client, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page.text)
    assert found, "the page carries no CSRF token"
    return found.group(1)


# -- the tests ----------------------------------------------------------------------------------------------


def test_log_in_refuses_a_wrong_token_and_sets_a_strict_http_only_cookie(
    api: ApiServer, driver: WebDriver
) -> None:
    token = api.add_user("alice", "vision")

    driver.get(api.url + "/")
    wait(driver, lambda d: d.current_url == api.url + "/login", "the log-in form instead of the queue")
    driver.find_element(By.ID, "token").send_keys("adt_not-a-token")
    driver.find_element(By.CSS_SELECTOR, 'form[action="/login"] button[type="submit"]').click()
    alert = wait(
        driver, EC.visibility_of_element_located((By.CSS_SELECTOR, "p.error[role=alert]")), "the error"
    )
    assert "token: not valid" in alert.text
    assert not [c for c in driver.get_cookies() if c["name"] == COOKIE]
    with http(api) as client:
        refused = client.post("/login", data={"token": "adt_not-a-token"})
        assert refused.status_code == 401 and "token: not valid" in refused.text
        assert COOKIE not in refused.headers.get("set-cookie", "")
        # another site's page cannot log a browser in (as its own user)
        foreign = client.post("/login", data={"token": token}, headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403 and COOKIE not in foreign.headers.get("set-cookie", "")

    log_in(driver, api, token)
    who = driver.find_element(By.CSS_SELECTOR, "header .who").text
    assert "alice" in who and "team vision" in who
    (cookie,) = [c for c in driver.get_cookies() if c["name"] == COOKIE]
    assert cookie["value"] == token
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert cookie["secure"] is False  # served over plain http here; see the Secure check below
    assert token not in driver.execute_script("return document.cookie")  # no script can read it

    with http(api) as client:
        ok = client.post("/login", data={"token": token})
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        for elsewhere in ("//evil.example/", "https://evil.example/", "/\\evil.example"):  # no open redirect
            away = client.post("/login", data={"token": token, "next": elsewhere})
            assert away.status_code == 303 and away.headers["location"] == "/", elsewhere
        set_cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "path=/" in set_cookie
        assert "secure" not in set_cookie
        # behind a TLS-terminating proxy (uvicorn trusts X-Forwarded-Proto from 127.0.0.1) it is Secure
        tls = client.post("/login", data={"token": token}, headers={"X-Forwarded-Proto": "https"})
        assert tls.status_code == 303 and "secure" in tls.headers["set-cookie"].lower()
    with http(api, token) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["referrer-policy"] == "same-origin"
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page.text
        assert "<script>" not in page.text  # all script is dashboard.js, as the policy demands

    driver.find_element(By.CSS_SELECTOR, 'form[action="/logout"] button').click()
    wait(driver, lambda d: d.current_url == api.url + "/login", "the log-in form after logging out")
    assert not [c for c in driver.get_cookies() if c["name"] == COOKIE]
    driver.get(api.url + "/")
    wait(driver, lambda d: d.current_url == api.url + "/login", "the log-in form once logged out")


def test_the_queue_lists_the_teams_jobs_and_refreshes_itself(
    api: ApiServer, driver: WebDriver, tmp_path: Path
) -> None:
    alice = api.add_user("alice", "vision")
    api.add_user("bob", "vision")
    api.add_user("carol", "speech")
    theirs = running(api, "bob", "vision", name="alexnet-bob")
    publish(api, theirs.id, *epochs_of(1, 1), step_event(2, 20))
    done = running(api, "alice", "vision", name="alexnet-done")
    api.store.store_result(done.id, {k: v for k, v in final_event("s3://m").items() if k != "type"})
    assert api.store.transition(done, JobState.SUCCEEDED, message="succeeded")
    queued = submit(api, "alice", "vision", name="alexnet-alice")
    other_team = submit(api, "carol", "speech", name="speech-carol")
    now = time.time()
    reason = "first in line; needs 2 gpu; waits for alexnet-bob to end"
    pending = {
        "reason": reason,
        "position": 1,
        "eta_start": now + 610,
        "eta_finish": now + 4300,
        "why": "room",
    }
    api.store.store_pending({queued.id: pending, other_team.id: {**pending, "position": 2}}, {}, now)

    log_in(driver, api, alice)
    rows = wait(
        driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs tr[data-job-id]"), "the queue's rows"
    )
    shown = [r.get_attribute("data-job-id") for r in rows]
    assert shown == [theirs.id, queued.id, done.id]  # running, waiting, ended; no other team's job
    run_row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{theirs.id}"]').text
    assert "RUNNING" in run_row and "bob" in run_row and "epoch 2/6 · step 20/50" in run_row
    wait_row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{queued.id}"]').text
    assert "QUEUED" in wait_row and "#1" in wait_row and reason in wait_row
    assert "starts in 10 min" in wait_row and "ends in 1 h 11 min" in wait_row
    done_row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{done.id}"]').text
    assert "SUCCEEDED" in done_row and "done · top-1 error 26.31 %" in done_row
    link = driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{queued.id}"] a')
    assert link.get_attribute("href") == f"{api.url}/jobs/{queued.id}"

    # the page polls: a new job and the running one's progress appear without a reload
    later = submit(api, "bob", "vision", name="alexnet-later")
    publish(api, theirs.id, step_event(2, 40))
    wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-job-id="{later.id}"]'),
        "the new job's row",
    )
    wait(
        driver,
        lambda d: "step 40/50" in d.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{theirs.id}"]').text,
        "the running job's new progress",
    )
    assert not driver.find_elements(By.CSS_SELECTOR, f'tr[data-job-id="{other_team.id}"]')
    screenshot(driver, tmp_path, "dashboard-queue.png", docs=True)

    driver.get(f"{api.url}/jobs/{queued.id}")  # a waiting job's page says why it waits
    line = wait(driver, EC.visibility_of_element_located((By.ID, "pending")), "the waiting reason").text
    assert line.startswith(f"#1 in line · {reason} · starts in 10 min")

    # another team's job is not found, exactly like one that does not exist
    driver.get(f"{api.url}/jobs/{other_team.id}")
    assert "not found" in wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "p.error"), "the 404").text

    driver.set_window_size(*PHONE)
    driver.get(api.url + "/")
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#jobs tr")) == 4, "the queue on a phone")
    assert_no_sideways_scroll(driver)
    screenshot(driver, tmp_path, "queue-phone.png")


def test_a_jobs_page_draws_live_curves_progress_and_its_result(
    api: ApiServer, driver: WebDriver, tmp_path: Path
) -> None:
    alice = api.add_user("alice", "vision")
    job = running(api, "alice", "vision", message="running on 2 workers")
    publish(api, job.id, *epochs_of(1, 4))

    log_in(driver, api, alice)
    driver.get(f"{api.url}/jobs/{job.id}")
    for series in ("train_loss", "val_top1_error", "val_top5_error", "lr"):
        wait(driver, lambda d, s=series: points(d, s) == 4, f"4 points of {series}")
    assert len(driver.find_elements(By.CSS_SELECTOR, 'g[data-series="val_top1_error"] circle.pt')) == 4
    assert points(driver, "step_loss") == 4 * STEPS // LOG_EVERY
    assert text_of(driver, "epoch-text") == "4 / 6 done"
    assert text_of(driver, "stat-top1") == f"{100 * epoch_event(4)['val_top1_error']:.2f} %"
    assert text_of(driver, "state") == "RUNNING" and text_of(driver, "message") == "running on 2 workers"
    # no Ray cluster here: the log says so in one line instead of failing the page
    wait(driver, lambda d: (text_of(d, "log") or "").startswith("logs unavailable: "), "the log's error")
    assert "Ray dashboard unreachable" in text_of(driver, "log")

    publish(api, job.id, step_event(5, 20))
    wait(driver, lambda d: text_of(d, "step-text") == "20 / 50", "the step progress")
    assert text_of(driver, "epoch-text") == "5 / 6" and text_of(driver, "stat-ips") == "1239.5"
    assert abs(float(driver.find_element(By.ID, "step-bar").get_attribute("value")) - 0.4) < 1e-6
    publish(api, job.id, *[step_event(5, s) for s in (30, 40, 50)], epoch_event(5), step_event(6, 30))
    for series in ("train_loss", "val_top1_error", "val_top5_error", "lr"):
        wait(driver, lambda d, s=series: points(d, s) == 5, f"the 5th point of {series}")
    wait(driver, lambda d: text_of(d, "step-text") == "30 / 50", "the next epoch's steps")
    screenshot(driver, tmp_path, "dashboard-job.png", docs=True)

    model_url = f"s3://ckpt/{job.id}/model.pt"
    publish(api, job.id, *[step_event(6, s) for s in (40, 50)], epoch_event(6), final_event(model_url))
    api.store.store_result(job.id, {k: v for k, v in final_event(model_url).items() if k != "type"})
    assert api.store.transition(api.store.get(job.id), JobState.SUCCEEDED, message="succeeded")
    wait(driver, lambda d: text_of(d, "state") == "SUCCEEDED", "the SUCCEEDED state")
    assert text_of(driver, "res-top1") == "26.31 %" and text_of(driver, "res-top5") == "5.12 %"
    assert (
        text_of(driver, "res-model") == model_url and text_of(driver, "res-crops") == "ten-crop, 10000 images"
    )
    wait(driver, lambda d: points(d, "val_top1_error") == 6, "the 6th epoch's point")
    wait(driver, lambda d: "ended" in text_of(d, "live"), "the end of the event stream")
    assert not driver.find_element(By.CSS_SELECTOR, 'button[data-action="cancel"]').is_displayed()

    # the page of an ended job replays its events: the same curves, the result from the record
    driver.refresh()
    wait(driver, lambda d: points(d, "val_top1_error") == 6, "the replayed curve")
    assert text_of(driver, "res-top1") == "26.31 %" and text_of(driver, "res-model") == model_url


def test_the_owner_cancels_and_resumes_from_the_jobs_page(api: ApiServer, driver: WebDriver) -> None:
    alice = api.add_user("alice", "vision")
    job = running(api, "alice", "vision")
    driver.set_window_size(*PHONE)  # a phone: the job's page fits its width, and its buttons work
    driver.get(f"{api.url}/jobs/{job.id}")  # logged out: the form, and then back to the job's page
    wait(driver, lambda d: d.current_url == f"{api.url}/login?next=%2Fjobs%2F{job.id}", "the log-in form")
    driver.find_element(By.ID, "token").send_keys(alice)
    driver.find_element(By.CSS_SELECTOR, 'form[action="/login"] button[type="submit"]').click()
    wait(driver, lambda d: d.current_url == f"{api.url}/jobs/{job.id}", "the job's page after logging in")
    cancel = wait(
        driver, EC.element_to_be_clickable((By.CSS_SELECTOR, 'button[data-action="cancel"]')), "Cancel"
    )
    assert not driver.find_element(By.CSS_SELECTOR, 'button[data-action="resume"]').is_displayed()
    assert_no_sideways_scroll(driver)

    cancel.click()  # the confirmation is dismissed: nothing happens
    WebDriverWait(driver, WAIT_S).until(EC.alert_is_present()).dismiss()
    assert not api.store.get(job.id).cancel_requested
    cancel.click()
    WebDriverWait(driver, WAIT_S).until(EC.alert_is_present()).accept()
    wait(
        driver,
        lambda d: d.find_element(By.ID, "cancel-note").is_displayed(),
        "'cancel requested' on the page",
    )
    rec = api.store.get(job.id)
    assert rec.cancel_requested and rec.state is JobState.RUNNING  # the dispatcher stops its Ray Job
    assert not cancel.is_enabled() and text_of(driver, "message") == "cancel requested"

    queued = submit(api, "alice", "vision", name="waiting")
    driver.get(f"{api.url}/jobs/{queued.id}")
    wait(
        driver, EC.element_to_be_clickable((By.CSS_SELECTOR, 'button[data-action="cancel"]')), "Cancel"
    ).click()
    WebDriverWait(driver, WAIT_S).until(EC.alert_is_present()).accept()
    wait(driver, lambda d: text_of(d, "state") == "CANCELLED", "CANCELLED on the page")
    assert api.store.get(queued.id).state is JobState.CANCELLED
    resume = wait(
        driver, EC.element_to_be_clickable((By.CSS_SELECTOR, 'button[data-action="resume"]')), "Resume"
    )
    assert not driver.find_element(By.CSS_SELECTOR, 'button[data-action="cancel"]').is_displayed()
    resume.click()
    wait(driver, lambda d: text_of(d, "state") == "QUEUED", "QUEUED again on the page")
    rec = api.store.get(queued.id)
    assert rec.state is JobState.QUEUED and rec.attempt == 2
    assert "attempt 2" in text_of(driver, "action-msg")


def test_a_team_mates_job_shows_no_buttons_and_the_api_refuses_its_change(
    api: ApiServer, driver: WebDriver
) -> None:
    alice = api.add_user("alice", "vision")
    api.add_user("bob", "vision")
    root = api.add_user("root", "ops", admin=True)
    message = '<script>document.title = "owned"</script><img src=x onerror="alert(1)"> & co'
    job = running(api, "bob", "vision", message=message)

    log_in(driver, api, alice)
    driver.get(f"{api.url}/jobs/{job.id}")
    wait(driver, lambda d: text_of(d, "state") == "RUNNING", "bob's job page")
    assert not driver.find_elements(By.CSS_SELECTOR, "button[data-action]")
    assert text_of(driver, "message") == message  # shown as text, never run
    assert not driver.find_elements(By.CSS_SELECTOR, "#message *") and "owned" not in driver.title
    csrf = driver.find_element(By.CSS_SELECTOR, 'meta[name="csrf-token"]').get_attribute("content")

    with http(api, alice, **{"X-CSRF-Token": csrf}) as client:  # the page's own cookie and CSRF token
        refused = client.post(f"/api/v1/jobs/{job.id}/cancel")
    assert refused.status_code == 403 and "only its owner or an admin" in refused.json()["error"]
    with http(api, Authorization=f"Bearer {alice}") as client:
        assert client.post(f"/api/v1/jobs/{job.id}/cancel").status_code == 403
    assert not api.store.get(job.id).cancel_requested

    driver.delete_all_cookies()  # an admin may change every job: the buttons are there for them
    log_in(driver, api, root)
    driver.get(f"{api.url}/jobs/{job.id}")
    wait(
        driver, EC.visibility_of_element_located((By.CSS_SELECTOR, 'button[data-action="cancel"]')), "Cancel"
    )


def test_a_change_by_cookie_without_the_csrf_token_is_refused(api: ApiServer) -> None:
    alice = api.add_user("alice", "vision")
    job = running(api, "alice", "vision")
    with http(api, alice) as client:
        csrf = page_csrf(client, f"/jobs/{job.id}")
        for headers in ({}, {"X-CSRF-Token": "0" * 64}):
            refused = client.post(f"/api/v1/jobs/{job.id}/cancel", headers=headers)
            assert refused.status_code == 403 and "CSRF" in refused.json()["error"], refused.text
        assert not api.store.get(job.id).cancel_requested
        assert client.post("/logout").status_code == 403  # logging out is a change too
        ok = client.post(f"/api/v1/jobs/{job.id}/cancel", headers={"X-CSRF-Token": csrf})
        assert ok.status_code == 200 and ok.json()["cancel_requested"] is True
        out = client.post("/logout", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert (
            f'{COOKIE}=""' in out.headers["set-cookie"] and "max-age=0" in out.headers["set-cookie"].lower()
        )
    assert api.store.get(job.id).cancel_requested
