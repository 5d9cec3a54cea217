"""The command line (`python -m harness ...`); `USAGE_ERROR` is every command's exit status for a
bad option or input, as pytest's own."""

USAGE_ERROR = 4
