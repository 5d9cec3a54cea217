"""`python -m harness init DIR`: a starter folder of claims that the installed package runs,
so a researcher's claims live in their own project, not in a checkout of this one."""

from __future__ import annotations

from pathlib import Path

CLAIMS = """\
# Your claims, one [[claim]] table each, measured on every model (default: the two tiny CODI
# models shipped with codi-hypotheses; --model NAME or a checkpoint path for others). Every key
# is checked before any model loads. The keys and every experiment kind: docs/writing-hypotheses.md
# in the codi-hypotheses repository; `pytest --list-claims` shows each claim with its defaults.

[[claim]]
id = "my-thoughts-carry-the-answer"
phase = 1
statement = "Replacing every continuous thought by its mean over the discovery split drops accuracy by more than 20 points: the answer is computed in the thoughts"
metric = "position_drop"
threshold = 20.0
direction = "greater"
experiment = { positions = ["latent"], mode = "mean" }

[[claim]]
id = "my-top3-heads-causal"
phase = 1
statement = "Zero-ablating the top-3 attention-ranked heads at the thoughts drops accuracy by more than 10 points; under 2 points they are redundant"
metric = "ablation_drop"
threshold = 10.0
direction = "greater"
refute_at = 2.0
labels = { supported = "causal", refuted = "redundant" }
experiment = { n_heads = 3, n_random = 5 }
"""  # noqa: E501 - a statement is one TOML line

TEST = '''\
"""Every claim in claims.toml, on every model: SUPPORTED passes, REFUTED fails with the numbers,
INCONCLUSIVE is its own outcome. A claim TOML cannot say is a test like this one over the
`model_run` fixture (docs/writing-hypotheses.md, "A claim in Python")."""

import pytest

from harness import claim_params


@pytest.mark.parametrize("claim", claim_params())
def test_claim(claim, run_claim, assert_claim):
    assert_claim(run_claim(claim))
'''

PYTEST_INI = """\
# codi_registry turns the CODI claims plugin on for runs in this folder and names its claims.
# Reports go to reports/, results are cached in .cache/results/ (both under the working directory).
[pytest]
codi_registry = claims.toml
"""

FILES = {"claims.toml": CLAIMS, "test_claims.py": TEST, "pytest.ini": PYTEST_INI}
# a pytest.ini would take precedence over the pytest settings these may hold
OTHER_CONFIGS = (".pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg")


class StarterError(ValueError):
    """A starter file would overwrite or override something of the user's; nothing was written."""


def write(directory: Path) -> list[Path]:
    """Write the starter files into `directory` (created if needed) and return their paths;
    refuse, before writing any, where one exists or another file may hold pytest settings."""
    existing = [directory / name for name in FILES if (directory / name).exists()]
    if existing:
        raise StarterError(f"{existing[0]} exists: init writes only new files (choose a new folder)")
    configs = [directory / name for name in OTHER_CONFIGS if (directory / name).exists()]
    if configs:
        raise StarterError(
            f"{configs[0]} may hold pytest settings that a new pytest.ini would replace: add "
            '`codi_registry = "claims.toml"` to them yourself, or init a new folder'
        )
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in FILES.items():
        (directory / name).write_text(text)
    return [directory / name for name in FILES]
