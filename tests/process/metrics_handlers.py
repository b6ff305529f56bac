"""Handlers for tests/process/test_metrics_scrape.py and test_tracing_e2e.py, run inside real consumers."""

import time


def work(payload):
    """Sleeps ``payload["ms"]``; raises when ``payload["fail"]`` (the worker nacks the task)."""
    time.sleep(payload.get("ms", 0) / 1000)
    if payload.get("fail"):
        raise RuntimeError(f"asked to fail: {payload.get('n')}")
