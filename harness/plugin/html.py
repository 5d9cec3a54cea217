"""The claims in pytest-html's own page: INCONCLUSIVE as its own counter and filter (never
"passed"), the page's title, and the run's versions, seed, n and model fingerprints in its
environment box. pytest-html has no hook for a new outcome: this reaches two of its internals
(the report writer's `_report`, its filter script's list), and tests/test_browser.py renders
the page in Chromium to catch an upgrade that moves either."""

from __future__ import annotations

from pathlib import Path

import pytest


class HtmlBridge:
    """Registered by the claims plugin; `state` is the session's (runs, data, report_dir)."""

    def __init__(self, state: dict) -> None:
        self.state = state
        self.inconclusive: dict[str, pytest.TestReport] = {}  # node id -> its call report

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport):
        """pytest-html files a test when its teardown is reported, reading the stored call
        report's outcome: while it does, an inconclusive call reads "inconclusive" (its own
        counter and filter), and "passed" again after."""
        if report.when == "call" and getattr(report, "inconclusive", None):
            self.inconclusive[report.nodeid] = report
        call = self.inconclusive.pop(report.nodeid, None) if report.when == "teardown" else None
        if call is None:
            return (yield)
        call.outcome = "inconclusive"
        try:
            return (yield)
        finally:
            call.outcome = "passed"

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """pytest-html's counters gain an "Inconclusive" category (after "Passed")."""
        html = _html_report(session.config)
        if html is None:
            return
        if "report_dir" in self.state:
            html._report.title = f"CODI claims — {self.state['report_dir'].name}"
            _environment(session.config, self.state)
        outcomes = html._report.outcomes
        items = list(outcomes.items())
        at = [k for k, _ in items].index("passed") + 1
        outcomes.clear()
        outcomes.update(items[:at] + [("inconclusive", {"label": "Inconclusive", "value": 0})] + items[at:])

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session: pytest.Session):
        """After pytest-html wrote its page: its filters learn the inconclusive category (else
        its script would hide those rows)."""
        result = yield
        html = _html_report(session.config)
        path = Path(session.config.getoption("htmlpath") or "")
        if html is not None and path.is_file():
            text = path.read_text()
            marker = "    'rerun',\n]"
            if text.count(marker) == 1:
                path.write_text(text.replace(marker, "    'rerun',\n    'inconclusive',\n]"))
        return result


def _environment(config: pytest.Config, state: dict) -> None:
    """pytest-html's environment box: versions, seed, n and each model's fingerprint."""
    try:
        from pytest_metadata.plugin import metadata_key
    except ImportError:
        return
    import torch
    import transformers

    metadata = config.stash.get(metadata_key, None)
    if metadata is None:
        return
    metadata["torch"] = torch.__version__
    metadata["transformers"] = transformers.__version__
    metadata["seed"] = config.getoption("seed")
    metadata["n problems"] = config.getoption("n_problems")
    metadata["device / dtype"] = f"{config.getoption('device')} / {config.getoption('dtype')}"
    for name, run in state["runs"].items():
        metadata[f"model {name}"] = f"fingerprint {run.fingerprint}, data {state['data'].get(name, '')}"


def _html_report(config: pytest.Config):
    """pytest-html's report writer in this process, if it writes one."""
    try:
        from pytest_html.basereport import BaseReport
    except ImportError:
        return None
    return next((p for p in config.pluginmanager.get_plugins() if isinstance(p, BaseReport)), None)
