"""`python -m flows ...` is the `tunefactory` command."""

from flows.cli import entry

entry()
