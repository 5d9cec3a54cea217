"""The pytest plugin: options, fixtures, the claims session, the pytest-html bridge, the inert
entry point."""
