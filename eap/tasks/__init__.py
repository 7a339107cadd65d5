"""Built-in tasks: IOI, greater-than, induction and subject-verb agreement.

``TASKS`` maps a task name to its builder, ``builder(model, n, seed=0, **kwargs) -> eap.Task``
(the names ``bench`` and the CLIs accept). Every builder takes ``metric=`` with its raw metric
as default and ``'normalized'`` as the alternative; see docs/tasks.md for metrics, units and
what a tokenizer needs.
"""

from typing import Callable

from eap.task import Task
from eap.tasks.common import sample_table
from eap.tasks.greater_than import greater_than
from eap.tasks.induction import induction
from eap.tasks.ioi import ioi, logit_diff, normalized
from eap.tasks.sva import sva
from eap.tasks.vocab import vocabulary, word_level_tokenizer

TaskBuilder = Callable[..., Task]

TASKS: dict[str, TaskBuilder] = {
    "ioi": ioi,
    "greater-than": greater_than,
    "induction": induction,
    "sva": sva,
}

__all__ = [
    "TASKS", "TaskBuilder", "greater_than", "induction", "ioi", "logit_diff",
    "normalized", "sample_table", "sva", "vocabulary", "word_level_tokenizer",
]
