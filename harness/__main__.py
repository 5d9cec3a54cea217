"""Command line: `python -m harness {train,evaluate,rank-heads,sweep,claims,init} ...` (see harness/cli.py)."""

from harness.cli import main

raise SystemExit(main())
