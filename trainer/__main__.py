"""`python -m trainer --config TRIAL.yaml --out DIR`: train and evaluate one trial (see trainer.cli)."""

import sys

from trainer.cli import main

sys.exit(main())
