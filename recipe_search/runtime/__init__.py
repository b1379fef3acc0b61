"""Runtime: execute a pruning plan on a transformers model through removable hooks."""
from .applier import PruningError, PruningHandle
from .plan import PruningPlan, schedule_from_drops
from .selection import RULES, ScoreContext, SelectionRule, make_rule

__all__ = ["PruningError", "PruningHandle", "PruningPlan", "RULES", "ScoreContext", "SelectionRule",
           "make_rule", "schedule_from_drops"]
