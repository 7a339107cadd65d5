"""Built-in tasks. ``ioi`` builds the indirect-object-identification task.

``TASKS`` maps a task's name to its builder ``builder(model, n, seed=0, **kwargs) -> eap.Task``;
``bench`` resolves ``--tasks NAME`` through it.
"""

from eap.tasks.ioi import ioi, logit_diff, normalized, sample_table, word_level_tokenizer

TASKS = {"ioi": ioi}

__all__ = ["TASKS", "ioi", "logit_diff", "normalized", "sample_table", "word_level_tokenizer"]
