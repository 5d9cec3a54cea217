"""Phase 4: does the mechanism matter more for hard problems? (4.1 difficulty tiers)"""

import pytest

from harness.pytest_plugin import claim_params


@pytest.mark.parametrize("claim", claim_params(4))
def test_claim(claim, model_name, judge_claim):
    judge_claim(claim, model_name)
