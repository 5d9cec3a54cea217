"""What is measured on a model: evaluation, the cached runner (`ModelRun`), discovery (attention
ranking), the causal sweep and screens, lens, probes, interchange, attributions, learned
subspaces."""
