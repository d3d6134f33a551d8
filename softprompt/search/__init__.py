"""Hard prompt tuning: score hand-written templates and label words (`templates.py`), and search trigger tokens
(`autoprompt.py`: AutoPrompt).

Both end in a plain text prompt (a `hard` prompt file: no tensors, the template and label words in
its task spec), which `eval`, serving and the benchmark use like any other. Both look only at a
seeded search split carved from train (`common.py`); every number they report comes from dev.
"""

from .autoprompt import (
    SLOT,
    VOCABULARIES,
    AutoPromptConfig,
    AutoPromptResult,
    autoprompt,
    fill,
    slotted,
    trigger_gradient,
    trigger_losses,
    trigger_scores,
    trigger_vocabulary,
)
from .common import bootstrap_ci, dev_split, hard_prompt, score_spec, scored_metrics, search_split, with_template
from .templates import (
    CANDIDATES_DIR,
    MAX_COMBINATIONS,
    Candidates,
    Scored,
    best_verbalizers,
    rank_templates,
    score_templates,
)

__all__ = [
    "CANDIDATES_DIR",
    "MAX_COMBINATIONS",
    "SLOT",
    "VOCABULARIES",
    "AutoPromptConfig",
    "AutoPromptResult",
    "Candidates",
    "Scored",
    "autoprompt",
    "best_verbalizers",
    "bootstrap_ci",
    "dev_split",
    "fill",
    "hard_prompt",
    "rank_templates",
    "score_spec",
    "score_templates",
    "scored_metrics",
    "search_split",
    "slotted",
    "trigger_gradient",
    "trigger_losses",
    "trigger_scores",
    "trigger_vocabulary",
    "with_template",
]
