"""`evaluate` metric modules shipped as local files, since `evaluate.load("rouge")` needs the hub."""

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def load(name: str):
    """Load a bundled metric module by name ('rouge' or 'bleu') with `evaluate.load(path)`."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))
