"""TuneFactory stages: one module per stage, each a pure build function plus a thin Prefect task."""

import warnings

from tasks.core.memory import allocate_large_tensors_on_huge_pages

# Here, not in the command: the first TuneFactory import of every entry point (the command, a deployment's
# flow run, each torchrun rank, the benches) comes before `import torch`, which is when torch reads it.
allocate_large_tensors_on_huge_pages()

# peft 0.21 probes `model.is_gradient_checkpointing`, which transformers 5 deprecated: a warning between
# the two libraries that a user can do nothing about, printed on every LoRA train and merge.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
