"""The dashboard of a standby in a real headless Chromium (the ``browser`` fixture of
test_dashboard_browser.py): two servers on one PostgreSQL journal, the standby's page says
"standby" (not an alarm: a standby is never ready, by design), the leader's "ready"."""

from __future__ import annotations

import pytest
from test_dashboard_browser import browser  # noqa: F401 (the fixture)
from test_failover import leader_pair

from support.procs import wait_until

pytestmark = pytest.mark.browser


def test_a_standbys_page_says_standby(tmp_path, key_file, pg_db, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    leader, standby = leader_pair(tmp_path, key_file, pg_db)

    def status(server) -> tuple[str, str]:
        browser.get(f"http://127.0.0.1:{server.http_port}/")
        element = browser.find_element(By.ID, "server-status")
        wait_until(lambda: "connections" in element.text, timeout=10, what="the page to draw the overview")
        return element.text, element.get_attribute("class")

    text, classes = status(standby)
    assert text.startswith("standby (not the leader) · ") and classes == "status", (text, classes)
    text, classes = status(leader)
    assert text.startswith("ready · ") and classes == "status good", (text, classes)
