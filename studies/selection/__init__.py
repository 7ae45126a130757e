"""Selection: the winning trial (pure rules), the MLflow Model Registry, and promotion of a winner."""

from studies.selection.promote import Selection, select
from studies.selection.registry import CHALLENGER, CHAMPION, Registry, RegistryError
from studies.selection.winner import Criterion, NoWinner, alias_for, criterion, pick_winner

__all__ = ["CHALLENGER", "CHAMPION", "Criterion", "NoWinner", "Registry", "RegistryError", "Selection", "alias_for",
           "criterion", "pick_winner", "select"]
