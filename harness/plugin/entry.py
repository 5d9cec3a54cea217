"""The `pytest11` entry point of an installed codi-hypotheses: it turns the claims plugin
(`harness.plugin.suite`) on only for a run that asks for claims, so that every other test
suite in the same environment gets nothing from it (no options, markers, report folder or
torch import at start-up).

A run asks with `codi_registry = FILE` in its pytest configuration (pytest.ini, or
`[tool.pytest.ini_options]`; `python -m harness init` writes one), or with `--registry FILE` or
`--report-dir DIR` on the command line. This repository's conftest.py loads the plugin itself:
pytest registers a plugin module once under its name, whoever asks first.
"""

from __future__ import annotations

import pytest

PLUGIN = "harness.plugin.suite"
INI = "codi_registry"
INI_HELP = "the CODI claims registry (relative to this file): turns the claims plugin on"
TRIGGERS = ("--registry", "--report-dir")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(INI, INI_HELP)


def asks_for_claims(args: list[str]) -> bool:
    """Whether a command line names a registry or a report folder (`--registry X` or `--registry=X`)."""
    return any(a in TRIGGERS or a.startswith(tuple(f"{t}=" for t in TRIGGERS)) for a in args)


def pytest_load_initial_conftests(early_config: pytest.Config, args: list[str]) -> None:
    """Register the plugin before the options are parsed (its options exist only for such a run)."""
    if early_config.getini(INI) or asks_for_claims(args):
        early_config.pluginmanager.import_plugin(PLUGIN)
