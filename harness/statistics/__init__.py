"""Numbers without models: paired effects, bootstrap intervals, McNemar, Holm, and the verdict
arithmetic (a CI against a threshold)."""
