"""Progressive redundant token masking.

A teacher's CLS->patch attention (the teacher ``masking.score_teacher`` names; '' scores every patch
equally) scores each patch: patches it barely attends to are redundant. A teacher without CLS scores by
its MAP query's attention or its patch-token norms (``masking.score``, ``SCORES``).
The student keeps K patches sampled without replacement with probability proportional to the score
(Gumbel-top-k), or the top K, or K uniformly at random. K is a Python int per stage so every shape
stays static under ``jit``: the step compiles once per stage.

A ``KeepPlan`` per ``masking.mode`` owns the counts and the selection (``keep_plan`` builds it from the
config): ``over_training`` keeps K patches at the student's input, K falling over training;
``over_depth`` drops nested subsets inside the student (EViT). ``base`` holds the shared machinery;
importing the package imports every module in it, so each plan registers itself: a new mode is one
module here with a ``@register``-ed ``KeepPlan`` subclass owning its fields, and nothing else to edit.
"""

from hybrid_distill_jax.masking.base import (
    PLANS,
    SCORES,
    SELECTIONS,
    KeepPlan,
    KeptTokens,
    check_scorer,
    check_section,
    keep_count,
    keep_plan,
    patch_scores,
    redundancy_scores,
    register,
    score_request,
    section,
    select_tokens,
)
from hybrid_distill_jax.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = [
    "PLANS",
    "SCORES",
    "SELECTIONS",
    "KeepPlan",
    "KeptTokens",
    "check_scorer",
    "check_section",
    "keep_count",
    "keep_plan",
    "patch_scores",
    "redundancy_scores",
    "register",
    "score_request",
    "section",
    "select_tokens",
]
