"""The web dashboard in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by Selenium): a server with a read token and an admin token, real consumers and traffic;
the page's numbers against /stats, its charts and clients, a dead letter requeued and another
purged through the page, markup in a payload shown as text, a screenshot
(tests/artifacts/dashboard.png). Refused: actions without the admin token, a cross-site form
post and a cross-origin fetch from another loopback origin opened in the same browser. A task
looked up and cancelled through the page.

The browser reaches only loopback: ``--host-resolver-rules`` maps every other name to nothing.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import secrets
import threading
from pathlib import Path

import pytest

import queuekit
from support.procs import ROOT, Proc, ServerProc, base_env, wait_until

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "tests" / "artifacts"
HOSTILE = '<img src=x id=pwned onerror="document.title=1">'


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        why = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    ARTIFACTS.mkdir(exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # never Selenium Manager: there is no network for it
    for arg in (
        "--headless=new",
        "--window-size=1400,1500",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run its sandbox as root
    service = Service(executable_path=CHROMEDRIVER, log_output=str(ARTIFACTS / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def write_token(path: Path) -> str:
    token = secrets.token_hex(32)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def post(port: int, path: str, body: dict, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        data = json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **headers})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def get_json(port: int, path: str, token: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        assert r.status == 200, (path, r.status)
        return json.loads(r.read())
    finally:
        conn.close()


class _Hostile(http.server.BaseHTTPRequestHandler):
    """Another origin on loopback: its pages try to make the dashboard act."""

    target = ""
    admin = ""

    def do_GET(self):  # noqa: N802
        body = {"/form": self._form(), "/fetch": self._fetch()}.get(self.path, "")
        data = body.encode()
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _form(self) -> str:
        # A form post needs no preflight: the classic CSRF. text/plain lets it carry a JSON-looking body.
        return (
            f'<form id=f method=POST action="{self.target}/api/dead/purge" enctype="text/plain">'
            '<input name=\'{"queue": "poison", "all": true, "x": "\' value=\'"}\'></form>'
            "<script>document.getElementById('f').submit()</script>"
        )

    def _fetch(self) -> str:
        # With the admin token itself (as if it leaked): the custom header forces a preflight.
        return (
            "<script>fetch('" + self.target + "/api/dead/purge', {method: 'POST', headers: "
            "{'Content-Type': 'application/json', 'X-Queuekit-Admin': '" + self.admin + "'}, "
            "body: JSON.stringify({queue: 'poison', all: true})})"
            ".then(r => { document.title = 'sent ' + r.status; })"
            ".catch(e => { document.title = 'blocked'; });</script>"
        )

    def log_message(self, *args):
        pass


def cells(driver, queue: str) -> dict[str, str]:
    """The page's queue row: field -> text (read in one script: the page redraws every few seconds,
    so elements found in one call may be gone in the next)."""
    return driver.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll("
        "'#queues tbody tr[data-queue=\"' + arguments[0] + '\"] td')).map(td => [td.dataset.field, td.textContent]))",
        queue,
    )


def click(driver, selector: str) -> None:
    """A real click on ``selector``, found again if a redraw replaced it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(10):
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{selector} kept being redrawn")


FIELDS = ("ready", "inflight", "delayed", "dead", "enqueued", "acked", "nacked", "redelivered", "dead_lettered")


def matches_stats(driver, port: int, token: str, queues: tuple[str, ...]) -> bool:
    stats = get_json(port, "/stats", token)["queues"]
    return all(
        cells(driver, q) == {"name": q, "waiting": str(stats[q]["waiting"]), **{f: str(stats[q][f]) for f in FIELDS}}
        for q in queues
    )


def test_dashboard_in_a_real_browser(tmp_path, key_file, browser):
    from selenium.webdriver.common.by import By

    read_token = write_token(tmp_path / "http-token")
    admin_token = write_token(tmp_path / "admin-token")
    env = base_env(
        QUEUEKIT_DASHBOARD_ADMIN_TOKEN_FILE=str(tmp_path / "admin-token"),
        QUEUEKIT_DASHBOARD_SAMPLE_SECONDS="0.5",
    )
    server = ServerProc(
        tmp_path, key_file, "--http-token-file", str(tmp_path / "http-token"), "--max-attempts", "0", env=env
    )
    port = server.http_port
    base = f"http://127.0.0.1:{port}"
    client = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    try:
        # Traffic: a consumer works through 60 tasks, 4 of which fail and are dead-lettered at once
        # (--max-attempts 0); the "poison" queue gets 3 dead letters by hand, one with markup.
        client.queue("tasks").put_many([{"n": i, "fail": i % 15 == 0} for i in range(60)])
        consumer = Proc(
            "consumer",
            [
                "consume",
                "--server",
                server.address,
                "--authkey-file",
                str(key_file),
                "--handler",
                "queuekit.examples:handle",
                "--concurrency",
                "2",
                "--lease",
                "3",  # a heartbeat (and its report, for the consumers table) every second
            ],
            tmp_path,
        )
        poison = client.queue("poison")
        poison.put_many([{"n": 1}, {"html": HOSTILE}, {"n": 3}])
        for task in poison.get_many(3, timeout=5):
            poison.nack(task, error=f"ValueError: task {task.id} is poison <b>bold</b>")
        client.queue("backlog").put_many([{"n": i} for i in range(7)])
        held = client.queue("backlog").get_many(2, lease=300)  # two in flight, held by this test
        assert len(held) == 2
        wait_until(
            lambda: client.stats()["queues"]["tasks"]["acked"] == 56 and client.stats()["queues"]["tasks"]["dead"] == 4,
            timeout=30,
            what="the consumer to finish the tasks",
        )

        # Without the read token the page loads (it holds no data) but the API answers 401.
        browser.get(base + "/")
        status = browser.find_element(By.ID, "server-status")
        wait_until(lambda: "401" in status.text, timeout=10, what="the page to report 401 without a token")

        browser.find_element(By.ID, "read-token").send_keys(read_token)
        browser.find_element(By.ID, "admin-token").send_keys(admin_token)
        browser.find_element(By.CSS_SELECTOR, "#credentials button").click()
        queues = ("tasks", "poison", "backlog")
        wait_until(
            lambda: matches_stats(browser, port, read_token, queues),
            timeout=15,
            what=lambda: f"the page's numbers to equal /stats: {[cells(browser, q) for q in queues]}",
        )
        backlog = cells(browser, "backlog")
        assert (backlog["ready"], backlog["inflight"]) == ("5", "2")
        assert "ready" in status.text and "memory only" in status.text

        # Charts: a line per series for every queue, once two samples exist.
        wait_until(
            lambda: len(browser.find_elements(By.CSS_SELECTOR, '#charts .card[data-queue="tasks"] path.series')) >= 3,
            timeout=10,
            what="the charts of queue tasks",
        )
        # Clients: the consumer's connection and this test's, as the server lists them.
        overview = get_json(port, "/api/overview", read_token)
        names = [c["name"] for c in overview["clients"]]
        assert any(n.startswith("consume") for n in names), names
        wait_until(
            lambda: len(browser.find_elements(By.CSS_SELECTOR, "#clients tbody tr")) == len(names),
            timeout=10,
            what="the clients table",
        )
        assert "127.0.0.1:" in browser.find_element(By.ID, "clients").text
        # Consumers: what the consumer said of itself on its last heartbeat.
        wait_until(
            lambda: (
                [e.text for e in browser.find_elements(By.CSS_SELECTOR, '#consumers td[data-field="pid"]')]
                == [str(consumer.pid)]
            ),
            timeout=10,
            what="the consumer's row in the consumers table",
        )
        row = browser.find_element(By.CSS_SELECTOR, "#consumers tbody tr").text
        assert "2 (thread)" in row and queuekit.__version__ in row, row

        # Dead letters of "poison" (chosen first: the queues with dead letters come first).
        def dead_rows():
            return browser.find_elements(By.CSS_SELECTOR, "#dead tbody tr")

        click(browser, '#dead-queue option[value="poison"]')
        wait_until(lambda: len(dead_rows()) == 3, timeout=10, what="three dead letters listed")
        table = browser.find_element(By.ID, "dead")
        assert "<img src=x id=pwned onerror=" in table.text and "<b>bold</b>" in table.text  # shown as text...
        assert not browser.find_elements(By.ID, "pwned") and browser.title == "queuekit dashboard"  # ...never run
        ids = browser.execute_script(
            "return Array.from(document.querySelectorAll('#dead tbody tr')).map(tr => Number(tr.dataset.task))"
        )
        assert sorted(ids) == sorted(t["id"] for t in poison.dead_list())

        # Requeue one through the page: it moves from dead to ready, on the server and on the page.
        click(browser, f'#dead tr[data-task="{ids[0]}"] button[data-act="requeue"]')
        wait_until(
            lambda: "requeue: 1 task(s) of poison" in browser.find_element(By.ID, "message").text,
            timeout=10,
            what="the requeue message",
        )
        stats = client.stats()["queues"]["poison"]
        assert (stats["ready"], stats["dead"]) == (1, 2)
        assert ids[0] not in [t["id"] for t in poison.dead_list()]
        wait_until(
            lambda: cells(browser, "poison").get("ready") == "1" and cells(browser, "poison")["dead"] == "2",
            timeout=10,
            what="the page to show the requeued task as ready",
        )
        # Purge another through the page.
        click(browser, f'#dead tr[data-task="{ids[1]}"] button[data-act="purge"]')
        wait_until(lambda: client.stats()["queues"]["poison"]["dead"] == 1, timeout=10, what="the purge")
        wait_until(lambda: len(dead_rows()) == 1, timeout=10, what="the page to list one dead letter")
        # Look up the requeued task and cancel it through the page (issue 13's task API).
        browser.find_element(By.ID, "task-id").send_keys(str(ids[0]))
        click(browser, '#task-form button[type="submit"]')

        def task_field(name):
            return browser.execute_script(
                "const r = document.querySelector('#task tr[data-field=\"' + arguments[0] + '\"] td');"
                "return r ? r.textContent : null;",
                name,
            )

        wait_until(lambda: task_field("state") == "ready", timeout=10, what="the task's state on the page")
        assert task_field("queue") == "poison" and task_field("id") == str(ids[0])
        click(browser, "#task-cancel")
        wait_until(lambda: task_field("state") == "cancelled", timeout=10, what="the task cancelled on the page")
        assert client.status(ids[0]).state == "cancelled" and client.stats()["queues"]["poison"]["ready"] == 0
        assert not browser.find_element(By.ID, "task-cancel").is_enabled()  # nothing left to cancel
        wait_until(lambda: matches_stats(browser, port, read_token, queues), timeout=15, what="the page = /stats")
        server.wait_for(r"event=dashboard_action peer=127\.0\.0\.1:\d+ action=requeue queue=poison count=1")

        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1400, min(height + 140, 4000))  # the whole page in one screenshot
        browser.execute_script("window.scrollTo(0, 0)")
        browser.get_screenshot_as_file(str(ARTIFACTS / "dashboard.png"))
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 20_000

        # Refused without the admin token (wrong or missing), with the read token: nothing moves.
        bearer = {"Authorization": f"Bearer {read_token}"}
        body = {"queue": "poison", "all": True}
        assert post(port, "/api/dead/purge", body, bearer)[0] == 403
        assert post(port, "/api/dead/purge", body, {**bearer, "X-Queuekit-Admin": "x" * 64})[0] == 403
        assert post(port, "/api/dead/purge", body, {"X-Queuekit-Admin": admin_token})[0] == 401  # no read token
        # Cross-site, even with both tokens: refused on what the browser says about the origin.
        admin = {**bearer, "X-Queuekit-Admin": admin_token}
        assert post(port, "/api/dead/purge", body, {**admin, "Sec-Fetch-Site": "cross-site"})[0] == 403
        assert post(port, "/api/dead/purge", body, {**admin, "Origin": "http://evil.example"})[0] == 403
        assert client.stats()["queues"]["poison"]["dead"] == 1

        # The same from a real page on another origin (another loopback port), in this browser.
        _Hostile.target, _Hostile.admin = base, admin_token
        hostile = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
        threading.Thread(target=hostile.serve_forever, daemon=True).start()
        try:
            other = f"http://127.0.0.1:{hostile.server_address[1]}"
            browser.get(other + "/form")
            server.wait_for(r"event=dashboard_refused path=/api/dead/purge code=403 reason=\"cross-site", timeout=10)
            browser.get(other + "/fetch")
            wait_until(lambda: browser.title == "blocked", timeout=10, what="the cross-origin fetch to fail")
        finally:
            hostile.shutdown()
            hostile.server_close()
        assert client.stats()["queues"]["poison"]["dead"] == 1  # nothing purged
        assert server.log().count("event=dashboard_action") == 3  # the page's requeue, purge, cancel; no more
        assert consumer.stop() == 0
    finally:
        client.close()
        server.stop()


def test_read_only_without_admin_token(tmp_path, key_file, browser):
    from selenium.webdriver.common.by import By

    server = ServerProc(tmp_path, key_file, "--max-attempts", "0")
    port = server.http_port
    client = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    try:
        q = client.queue("jobs")
        q.put({"n": 1})
        q.nack(q.get(timeout=5), error="boom")
        browser.get(f"http://127.0.0.1:{port}/")
        wait_until(lambda: cells(browser, "jobs").get("dead") == "1", timeout=10, what="the queue row")
        note = browser.find_element(By.ID, "actions-note").text
        assert "read-only" in note
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#dead tbody tr"), timeout=10, what="dead row")
        buttons = browser.find_elements(By.CSS_SELECTOR, "button.action")
        assert buttons and all(not b.is_enabled() for b in buttons)
        # Looking a task up needs no admin token; cancelling it does.
        browser.find_element(By.ID, "task-id").send_keys(str(q.dead_list()[0]["id"]))
        click(browser, '#task-form button[type="submit"]')
        wait_until(lambda: "dead" in browser.find_element(By.ID, "task").text, timeout=10, what="the task looked up")
        assert not browser.find_element(By.ID, "task-cancel").is_enabled()
        # No read token on the port and no admin token in the page: payload and error stay hidden.
        assert "payloads and errors hidden" in browser.find_element(By.ID, "dead-note").text
        assert "boom" not in browser.find_element(By.ID, "dead").text
        status, body = post(port, "/api/dead/requeue", {"queue": "jobs", "ids": None}, {"X-Queuekit-Admin": "x" * 64})
        assert status == 403 and "actions are off" in body["error"]
        assert client.stats()["queues"]["jobs"]["dead"] == 1
    finally:
        client.close()
        server.stop()
