"""The names a user chooses between (CLI ``choices``, validated settings, plan fields).

Torch-free and import-free on purpose: the plan file format, the CLI parser and the
allocation settings all read them without pulling in torch or transformers.
"""

from __future__ import annotations

TASKS = ("causal-lm", "seq-cls", "seq2seq-lm")
SCORES = ("variance", "fisher")  # which LayerStats statistic becomes a layer's score
GRANULARITIES = ("sample", "batch")  # one gradient per sample (the design) or per batch (the paper's code)
ALPHA_POLICIES = ("fixed_scale", "fixed_alpha", "rslora")
QUANTIZATIONS = ("nf4", "fp4", "int8")  # bitsandbytes loads of the base model
# What to do when the rank map cannot be told from noise (flat scores or an unstable map).
IF_UNCERTAIN = ("uniform", "allocate", "error")

__all__ = ["ALPHA_POLICIES", "GRANULARITIES", "IF_UNCERTAIN", "QUANTIZATIONS", "SCORES", "TASKS"]
