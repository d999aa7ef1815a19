"""`python -m flows ...` is the `tunefactory` command."""

import sys

from flows.cli import main

sys.exit(main())
