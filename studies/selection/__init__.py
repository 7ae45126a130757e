"""Selection: the winning trial (pure rules), the MLflow Model Registry, and promotion of a winner."""

from studies.selection.promote import Promotion, Selection, ShadowRule, promote_challenger, select
from studies.selection.registry import CHALLENGER, CHAMPION, Registry, RegistryError
from studies.selection.winner import Criterion, NoWinner, alias_for, criterion, pick_winner

__all__ = ["CHALLENGER", "CHAMPION", "Criterion", "NoWinner", "Promotion", "Registry", "RegistryError", "Selection",
           "ShadowRule", "alias_for", "criterion", "pick_winner", "promote_challenger", "select"]
