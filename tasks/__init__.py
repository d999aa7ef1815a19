"""TuneFactory stages: one module per stage, each a pure build function plus a thin Prefect task."""
