"""`python -m orchestrator ...`: the command line (orchestrator/cli.py)."""

import sys

from orchestrator.cli import main

sys.exit(main())
