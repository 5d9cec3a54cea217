"""Phase 1: are the critical heads and the hub thought causal? (claims 1.1-1.3)"""

import pytest

from harness.pytest_plugin import claim_params


@pytest.mark.parametrize("claim", claim_params(1))
def test_claim(claim, model_name, judge_claim):
    judge_claim(claim, model_name)
