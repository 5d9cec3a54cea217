"""Root conftest: kept thin; fixtures live in `fixtures/`."""

pytest_plugins = ["fixtures.sessions"]
