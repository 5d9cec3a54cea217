"""Phase 3: what do the thoughts encode, and where does it come from? (3.1 probes, 3.2 attribution)"""

import pytest

from harness.pytest_plugin import claim_params


@pytest.mark.parametrize("claim", claim_params(3))
def test_claim(claim, model_name, judge_claim):
    judge_claim(claim, model_name)
