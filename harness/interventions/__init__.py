"""Interventions over raw HF modules: hooks (head ablation, capture), attention-pattern overrides,
thought patches, path patching, subspaces, transplants, and the typed specs that name them (the
cache keys)."""
