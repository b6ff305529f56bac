"""The dashboard of a standby in a real headless Chromium (the ``browser`` fixture of
test_dashboard_browser.py): two servers on one PostgreSQL journal, the standby's page says
"standby" (not an alarm: a standby is never ready, by design), the leader's "ready"; a server
that cannot open a session to the database says "no journal session" (an alarm: it cannot take
over), and "ready" again once it leads again."""

from __future__ import annotations

import pytest
from test_dashboard_browser import browser  # noqa: F401 (the fixture)
from test_failover import ha_server, leader_pair
from test_standby_metrics import cut_off, leads, terminate_sessions

from support.procs import wait_until

pytestmark = pytest.mark.browser


def status(browser, server, drawn: str = "connections") -> tuple[str, str]:  # noqa: F811
    """The page's server status line and its classes, once the overview says ``drawn``."""
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{server.http_port}/")
    element = browser.find_element(By.ID, "server-status")
    wait_until(lambda: drawn in element.text, timeout=10, what=lambda: f"the page to say {drawn!r}: {element.text!r}")
    return element.text, element.get_attribute("class")


def test_a_standbys_page_says_standby(tmp_path, key_file, pg_db, browser):  # noqa: F811
    leader, standby = leader_pair(tmp_path, key_file, pg_db)
    text, classes = status(browser, standby)
    assert text.startswith("standby (not the leader) · ") and classes == "status", (text, classes)
    assert "no journal session" not in text
    text, classes = status(browser, leader)
    assert text.startswith("ready · ") and classes == "status good", (text, classes)


def test_a_server_without_a_journal_session_says_so(tmp_path, key_file, pg_db, browser):  # noqa: F811
    server = ha_server(tmp_path, key_file, pg_db)
    wait_until(lambda: leads(server), what="the server leading")
    pg_db.server.sql(f'ALTER DATABASE "{pg_db.name}" ALLOW_CONNECTIONS false')
    try:
        terminate_sessions(pg_db)
        wait_until(lambda: cut_off(server), timeout=20, what="the server without a journal session")
        text, classes = status(browser, server, "no journal session")
        assert text.startswith("standby (not the leader) · no journal session · "), text
        assert classes == "status bad", classes
    finally:
        pg_db.server.sql(f'ALTER DATABASE "{pg_db.name}" ALLOW_CONNECTIONS true')
    wait_until(lambda: leads(server), timeout=20, what="the server leading again")
    text, classes = status(browser, server, "ready")
    assert text.startswith("ready · ") and classes == "status good", (text, classes)
