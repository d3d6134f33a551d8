"""Tasks: data files -> templated examples -> token batches.

`tasks.py` (specs, files, rendered splits), `streams.py` (seeded example streams for training),
`encoding.py` (texts -> `Example`s through the model family, batching helpers).
"""

from .encoding import TRUNCATIONS, Encoder, collate, frequent_token_ids
from .streams import ShuffledExamples, StreamedExamples
from .tasks import BUILTIN_DIR, MASK_FIELD, Split, Task, TaskSpec, builtin_tasks, default_data_root, load_task

__all__ = [
    "BUILTIN_DIR",
    "MASK_FIELD",
    "TRUNCATIONS",
    "Encoder",
    "ShuffledExamples",
    "Split",
    "StreamedExamples",
    "Task",
    "TaskSpec",
    "builtin_tasks",
    "collate",
    "default_data_root",
    "frequent_token_ids",
    "load_task",
]
