"""Claims as data and their verdicts: the registry, one experiment kind per file (`kinds/`), error
analysis."""
