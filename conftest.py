"""Root conftest: kept thin. The claims plugin and the session fixtures live in the library."""

pytest_plugins = ["harness.plugin.suite", "fixtures.sessions"]
