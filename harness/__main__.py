"""Command line: `python -m harness {train,evaluate} ...`."""

from harness.cli import main

raise SystemExit(main())
