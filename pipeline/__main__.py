"""`python -m pipeline` runs the `turnwise` command, for environments without the console script."""

import sys

from pipeline.cli import main

sys.exit(main())
