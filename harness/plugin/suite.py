"""The pytest plugin that turns claims into tests: markers, fixtures, verdict outcomes and the
report written at the end of a session (its options and their checks: `options.py`).

SUPPORTED passes; REFUTED fails with the numbers; INCONCLUSIVE is reported as its own outcome
('I', "inconclusive") and does not fail the run. A model whose baseline accuracy is below
--min-baseline is not judged: its rows are NOT JUDGED (skipped, with the reason) and the run
exits with `NOT_JUDGED`. The registry and every claim's parameters are
checked when the session starts: a mistake is one line and exit status 4 before any model runs.

Fixtures for claim tests (registry rows and researchers' own Python claims alike):
`model_run` (the `ModelRun` of the test's `model_name`), `run_claim(claim)` (a registry claim
measured, phase gates applied) and `assert_claim(result)` (records the row for the report,
then passes, fails or reports INCONCLUSIVE).

This checkout's conftest.py loads it (or `-p harness.plugin.suite`); an installed package's
`pytest11` entry point (`harness.plugin.entry`) loads it only for a run that names a registry
or a report folder.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.data.problems import DataError
from harness.interventions.hooks import InterventionError, leftover_hooks
from harness.judgment.claims import (
    PHASES,
    Claim,
    ClaimError,
    check_against_model,
    evaluate_claim,
    load_registry,
    unjudged,
)
from harness.measures.runner import ModelRun
from harness.plugin.entry import INI
from harness.plugin.html import HtmlBridge
from harness.plugin.options import FLIPPED, NOT_JUDGED, add_options, check_options
from harness.plugin.session import (
    Progress,
    Uncaptured,
    load_runs,
    registry_path,
    reports_dir,
    runs_claims,
)
from harness.report.folder import KEEP_REPORTS, new_run_dir, prune_reports, write_report
from harness.report.runinfo import run_info
from harness.runtime.arch import SiteError
from harness.runtime.codi import ModelLoadError
from harness.runtime.models import SHIPPED
from harness.runtime.positions import PositionError
from harness.runtime.progress import show_on
from harness.statistics.verdicts import NOT_JUDGED_VERDICT, ClaimResult, not_judged

_REGISTRY: dict[str, Claim] = {}  # the session's claims by id, loaded in `pytest_configure`


def claim_params(phase: int | None = None) -> list:
    """The registry's claims of one phase (default: every phase) as pytest parameters: id =
    claim id, marker = phase. One test over every phase keeps a researcher's new claim from
    going unrun because no test file asks for its phase."""
    return [
        pytest.param(c, id=c.id, marks=getattr(pytest.mark, c.marker))
        for c in _REGISTRY.values()
        if phase is None or c.phase == phase
    ]


RESULT_KEY = "codi_claim_result"
_STATE = pytest.StashKey[dict]()


class Inconclusive(Exception):
    """Raised by a claim test whose CI straddles its criteria."""


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for phase in PHASES:
        config.addinivalue_line("markers", f"phase{phase}: claims of phase {phase} of the seed plan")
    state = {"enabled": runs_claims(config), "runs": {}, "collector": _Collector(), "recorded": set()}
    config.pluginmanager.register(state["collector"], "codi-claims-collector")
    config.pluginmanager.register(HtmlBridge(state), "codi-claims-html")
    config.stash[_STATE] = state
    if config.getoption("list_claims"):  # collect (so -k / -m select) and list; load no model
        state["listing"] = state["enabled"] = True
        try:
            _REGISTRY.clear()
            _REGISTRY.update({c.id: c for c in load_registry(registry_path(config))})
        except ClaimError as e:
            raise pytest.UsageError(str(e)) from None
        return
    if not state["enabled"]:
        return
    # torch and transformers leave ~10^6 long-lived objects; pytest garbage-collects 5 times at
    # the end (its unraisable-exception check), 1.5 s on a warm 10 s run: exempt what exists now
    gc.freeze()
    try:
        claims = load_registry(registry_path(config))
        _REGISTRY.clear()
        _REGISTRY.update({c.id: c for c in claims})
        state["runs"], state["data"] = load_runs(config)
        for name, run in state["runs"].items():
            run.peers = {other: r for other, r in state["runs"].items() if other != name}
            if not hasattr(config, "workerinput"):  # an xdist worker's output reaches no terminal
                run.on_measured = Progress(config)
            check_against_model(claims, run.geometry, run.n_latent, name)
    except (ClaimError, ModelLoadError, DataError, InterventionError, SiteError) as e:
        raise pytest.UsageError(str(e)) from None
    if hasattr(config, "workerinput"):  # xdist workers measure; the controller reports
        return
    check_options(config)
    if config.getoption("collectonly"):  # nothing will be measured: no report folder
        return
    chosen = config.getoption("report_dir")
    if chosen and (Path(chosen) / "claims.json").exists():
        raise pytest.UsageError(f"--report-dir {chosen} already holds a report; choose a new folder")
    report_dir = Path(chosen or new_run_dir(reports_dir(config)))
    state["report_dir"] = report_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    if config.pluginmanager.hasplugin("html") and not config.getoption("htmlpath"):
        config.option.htmlpath = str(report_dir / "report.html")
        config.option.self_contained_html = True


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_name" in metafunc.fixturenames:
        state = metafunc.config.stash[_STATE]
        names = list(state["runs"]) or (metafunc.config.getoption("model") or list(SHIPPED))
        # one xdist group per model (`--dist loadgroup`): one worker measures one model; marks
        # set here exist before any collection hook (xdist's worker reads them in its own)
        params = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in names]
        metafunc.parametrize("model_name", params, scope="session")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Claim tests that received no claim (an empty registry, or the plugin off for this run)
    would be skipped as `NOTSET` and the run would pass having measured nothing: a usage error."""
    wanting = [i for i in items if "claim" in getattr(i, "fixturenames", ())]
    claims = [i for i in wanting if isinstance(getattr(getattr(i, "callspec", None), "params", {}).get("claim"), Claim)]
    if wanting and not claims:
        where = registry_path(config) if config.stash[_STATE]["enabled"] else None
        _refuse(
            f"{wanting[0].nodeid.split('[')[0]} parametrizes no claim: "
            + (f"{where} holds none it selects" if where else
               f"the claims plugin is off for this run (name --registry FILE, {INI} or --report-dir DIR)")
        )  # fmt: skip


@pytest.fixture
def model_run(request: pytest.FixtureRequest, model_name: str) -> ModelRun:
    """The session's run of the test's model: `measure(spec)`, `paired(spec)`, `effect(...)`."""
    state = request.config.stash[_STATE]
    if not state["enabled"]:
        _refuse(
            f"the claims plugin is off for this run (it turns on for tests under hypotheses/, with --registry "
            f"FILE, {INI} in the pytest configuration or --report-dir DIR): name your registry or a report folder"
        )
    return state["runs"][model_name]


def _unmet_gate(claim: Claim, run: ModelRun) -> ClaimResult | None:
    """The first claim up `claim`'s chain of gates that is not SUPPORTED on `run` (a gate's own
    gate first: a claim whose gate could not run cannot run either), else None."""
    if claim.gate is None:
        return None
    gate = _REGISTRY[claim.gate]
    unmet = _unmet_gate(gate, run)
    if unmet is not None:
        return unmet
    result = evaluate_claim(gate, run)
    return result if result.verdict != "SUPPORTED" else None


@pytest.fixture
def run_claim(request: pytest.FixtureRequest, model_run: ModelRun) -> Callable[[Claim], ClaimResult]:
    """`run_claim(claim)`: a registry claim measured on the test's model. A phase-2 claim whose
    gate is not SUPPORTED is skipped with the reason (unless --no-gates)."""

    def run(claim: Claim) -> ClaimResult:
        gate = None if request.config.getoption("no_gates") else _unmet_gate(claim, model_run)
        if gate is not None:
            pytest.skip(
                f"phase {gate.phase} gate not met: {gate.id} is {gate.verdict} for {model_run.name} "
                f"(effect {gate.effect:+.1f} {gate.units}, 95% CI {gate.ci_low:+.1f} to {gate.ci_high:+.1f}); "
                "pivot to distributed analysis (or force with --no-gates)"
            )
        why = _below_floor(request.config, model_run)
        return unjudged(claim, model_run, why) if why else evaluate_claim(claim, model_run)

    return run


@pytest.fixture
def assert_claim(request: pytest.FixtureRequest) -> Callable[[ClaimResult], ClaimResult]:
    """`assert_claim(result)`: record the row for the report, then pass (SUPPORTED), fail with
    the numbers (REFUTED) or report INCONCLUSIVE. Also asserts that no hook was left behind.

    The row travels with the test report (user properties), so the report is written by
    whichever process collects the reports: the session itself, or the xdist controller.
    """
    state = request.config.stash[_STATE]

    def check(result: ClaimResult) -> ClaimResult:
        where, own = request.node.nodeid, getattr(getattr(request.node, "callspec", None), "params", {})
        if own.get("model_name", result.model) != result.model:
            _refuse(f"{where}: a result for {result.model} recorded by {own['model_name']}'s test")
        if (result.id, result.model) in state["recorded"]:
            _refuse(f"{where}: claim {result.id!r} on {result.model} is recorded twice: give each its own id")
        state["recorded"].add((result.id, result.model))
        run = state["runs"].get(result.model)
        why = _below_floor(request.config, run) if run is not None else None
        if why and result.verdict != NOT_JUDGED_VERDICT:  # a Python claim on a model the floor rules out
            result = not_judged(result, why)
        leftovers = leftover_hooks(run.codi) if run is not None and run.model.loaded else []
        assert not leftovers, f"an intervention left hooks behind: {leftovers}"
        row = json.loads(json.dumps(result.as_row(), default=float))  # plain types: rows cross to xdist's controller
        request.node.user_properties.append((RESULT_KEY, row))
        if result.verdict == NOT_JUDGED_VERDICT:
            pytest.skip(f"{result.id} on {result.model}: not judged: {result.details['note']}")
        if result.verdict == "REFUTED":
            pytest.fail(result.message(), pytrace=False)
        if result.verdict == "INCONCLUSIVE":
            raise Inconclusive(result.message())
        return result

    return check


def _below_floor(config: pytest.Config, run: ModelRun) -> str | None:
    """Why `run`'s model is not judged (its baseline accuracy is below --min-baseline), or None."""
    floor = config.getoption("min_baseline")
    if not floor:
        return None
    accuracy = run.baseline.mean("accuracy")
    if accuracy >= floor:
        return None
    return (
        f"baseline accuracy {accuracy:.1f}% on {len(run.problems)} problems is below --min-baseline {floor:g}: "
        "check --base, --n-latent and --data (a model that solves nothing is no finding)"
    )


class _Collector:
    """Gathers claim results from test reports (this session's or the xdist workers')."""

    def __init__(self) -> None:
        self.results: list[ClaimResult] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            self.results += [ClaimResult(**row) for key, row in report.user_properties if key == RESULT_KEY]


def _refuse(message: str) -> None:
    """Stop the run as a usage error (exit status 4, one line): what a claim asked for cannot run."""
    pytest.exit(f"ERROR: {message}", returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Progress bars inside a claim's evaluations show past the output capture; a condition a
    Python claim names that the model cannot run (a head or thought out of range, parts that
    would override each other) is a usage error, not a finding."""
    state = item.config.stash.get(_STATE, {})
    if not state.get("enabled"):
        return (yield)
    try:
        if item.config.get_verbosity() < -1:
            return (yield)
        with show_on(Uncaptured(item.config)):
            return (yield)
    except (InterventionError, SiteError, PositionError) as e:
        _refuse(f"{item.nodeid}: {e}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance(Inconclusive):
        report.outcome = "passed"
        report.inconclusive = str(call.excinfo.value)
        report.longrepr = None
    return report


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    if getattr(report, "inconclusive", None) and report.when == "call":
        return "inconclusive", "I", "INCONCLUSIVE"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    """--list-claims: the claims the selection (-k, -m, paths) keeps, registry claims with every
    parameter and Python claims by test id, each with its models; nothing runs."""
    if not session.config.stash.get(_STATE, {}).get("listing"):
        return None
    registry, python = {}, {}
    for item in session.items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        model = params.get("model_name", "")
        if isinstance(params.get("claim"), Claim):
            registry.setdefault(params["claim"].id, (params["claim"], []))[1].append(model)
        else:
            where = f"{os.path.relpath(item.path)}::{getattr(item, 'originalname', item.name)}"
            python.setdefault(where, []).append(model)
    reporter = session.config.pluginmanager.getplugin("terminalreporter")
    for claim, models in registry.values():
        reporter.write_line(f"{claim.describe()}\n    models: {', '.join(dict.fromkeys(models))}")
    for nodeid, models in python.items():
        reporter.write_line(f"{nodeid}  Python claim  models: {', '.join(dict.fromkeys(m for m in models if m))}")
    path, total = registry_path(session.config), len(_REGISTRY)
    count = f"{len(registry)}" if len(registry) == total else f"{len(registry)} of {total}"
    shown = f"{count} claims in {path}"
    reporter.write_line(shown + (f"; {len(python)} Python claim tests" if python else ""))
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(_STATE, {})
    results = state["collector"].results if state else []
    if results and "report_dir" in state:
        config = session.config
        run = run_info(
            state["report_dir"].name,
            seed=config.getoption("seed"),
            device=config.getoption("device"),
            dtype=config.getoption("dtype"),
            reference_batching=config.getoption("reference_batching"),
            registry=registry_path(config),
            claim_files=[Path(a.split("::")[0]) for a in config.args],
            data=state["data"],
            runs=state["runs"],
        )
        compare_to = config.getoption("compare_to")
        state["written"] = write_report(
            state["report_dir"], results, state["runs"], run, Path(compare_to) if compare_to else None
        )
        usual = session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
        state["unjudged"] = {r.model: r.details["note"] for r in results if r.verdict == NOT_JUDGED_VERDICT}
        if state["unjudged"] and usual:
            session.exitstatus = NOT_JUDGED  # a model below the floor: neither a pass nor a finding
        elif config.getoption("fail_on_flip") and state["written"].flips and usual:
            session.exitstatus = state["flipped"] = FLIPPED  # what pytest exits with: a flip pages someone
        if not config.getoption("report_dir"):
            keep = config.getoption("keep_reports") or KEEP_REPORTS
            state["pruned"] = prune_reports(reports_dir(config), keep, state["report_dir"])


def pytest_html_results_summary(prefix: list, summary: list, postfix: list, session: pytest.Session) -> None:
    written = session.config.stash.get(_STATE, {}).get("written")
    if written:
        prefix.append(written.html)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, {})
    written = state.get("written")
    if not written:
        return
    terminalreporter.section("CODI claims")
    for line in written.lines:
        terminalreporter.write_line(line)
    if not config.pluginmanager.hasplugin("dsession"):  # under xdist the workers load, not this process
        loaded = [name for name, run in state["runs"].items() if run.model.loaded]
        terminalreporter.write_line(f"models loaded: {', '.join(loaded) or 'none (every result was in the cache)'}")
    for model, why in state.get("unjudged", {}).items():
        terminalreporter.write_line(f"{model} not judged: {why} (exit status {NOT_JUDGED})")
    terminalreporter.write_line(f"report: {written.directory}")
    if state.get("flipped"):
        terminalreporter.write_line(f"exit status {FLIPPED} (--fail-on-flip): {len(written.flips)} verdict(s) changed")
