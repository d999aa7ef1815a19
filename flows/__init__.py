"""TuneFactory flows: how stages compose into runs, and the `tunefactory` command line."""
