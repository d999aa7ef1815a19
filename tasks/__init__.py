"""TuneFactory stages: one module per stage, each a pure build function plus a thin Prefect task."""

import warnings

# peft 0.21 probes `model.is_gradient_checkpointing`, which transformers 5 deprecated: a warning between
# the two libraries that a user can do nothing about, printed on every LoRA train and merge.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
