"""Command line: `python -m harness {train,evaluate,rank-heads,sweep,claims,init} ...` (see harness/commands/cli.py)."""

from harness.commands.cli import main

raise SystemExit(main())
