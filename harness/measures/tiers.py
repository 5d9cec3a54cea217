"""Difficulty tiers (experiment 4.1): from the gold solution's number of reasoning steps and
the baseline's confidence in its first answer token.

easy: confidence > 0.9 and 1 step; hard: confidence < 0.6 or 3+ steps; medium: the rest.
"""

from __future__ import annotations

import numpy as np

TIERS = ("easy", "medium", "hard")
EASY_CONFIDENCE = 0.9
HARD_CONFIDENCE = 0.6
HARD_STEPS = 3


def assign_tiers(n_steps: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """[N] steps, [N] confidence -> [N] tier names."""
    n_steps, confidence = np.asarray(n_steps), np.asarray(confidence)
    assert n_steps.shape == confidence.shape, "one step count and one confidence per problem"
    hard = (confidence < HARD_CONFIDENCE) | (n_steps >= HARD_STEPS)
    easy = (confidence > EASY_CONFIDENCE) & (n_steps == 1) & ~hard
    return np.where(hard, "hard", np.where(easy, "easy", "medium"))


def tier_sizes(tiers: np.ndarray) -> dict[str, int]:
    return {t: int(np.sum(tiers == t)) for t in TIERS}
