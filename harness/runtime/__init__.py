"""The CODI runtime: the per-architecture site table (`Head`), named positions, the model and its
loading, the KV-cached latent loop, the result cache and progress bars."""
