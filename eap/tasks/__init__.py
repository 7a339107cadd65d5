"""Built-in tasks. ``ioi`` builds the indirect-object-identification task."""

from eap.tasks.ioi import ioi, logit_diff, normalized, sample_table, word_level_tokenizer

__all__ = ["ioi", "logit_diff", "normalized", "sample_table", "word_level_tokenizer"]
