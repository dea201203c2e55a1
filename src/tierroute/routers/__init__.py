"""Routers by name, and saved routers by path.

Built-in names: random, rules, knn, logreg, mf (factor router over every model's
scores), irt (its rank-0 form: a model ability and a prompt difficulty) and bert (a
fine-tuned MiniLM classifier; training needs the `train` extra). Anything else is taken
as the path of a saved router folder (see `tierroute.artifact`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tierroute.encoder import Encoder, TextEncoder
from tierroute.errors import RouterError
from tierroute.routers.base import BaseRouter, Router

BUILTIN = ("random", "rules", "knn", "logreg", "mf", "irt", "bert")
LEARNED = ("knn", "logreg", "mf", "irt", "bert")

__all__ = ["BUILTIN", "LEARNED", "BaseRouter", "Router", "make_router"]


def make_router(
    name: str,
    encoder_factory: Callable[[], Encoder] = TextEncoder,
    seed: int = 0,
) -> BaseRouter:
    """A fresh router of a built-in kind (unfitted if it learns)."""
    if name == "random":
        from tierroute.routers.random_router import RandomRouter

        return RandomRouter(seed=seed)
    if name == "rules":
        from tierroute.routers.rules import RulesRouter, load_rules
        from tierroute.tagger import Tagger

        rules = load_rules()
        tagger = Tagger(encoder_factory()) if rules.uses_tags else None
        return RulesRouter(rules, tagger)
    if name == "knn":
        from tierroute.routers.knn import KnnRouter

        return KnnRouter(encoder_factory())
    if name == "logreg":
        from tierroute.routers.logreg import LogRegRouter
        from tierroute.tagger import Tagger

        encoder = encoder_factory()
        return LogRegRouter(encoder, Tagger(encoder))
    if name in ("mf", "irt"):
        from tierroute.routers.factor import FactorRouter

        return FactorRouter(encoder_factory(), rank=16 if name == "mf" else 0, seed=seed)
    if name == "bert":
        from tierroute.routers.finetuned import FineTunedRouter

        return FineTunedRouter(seed=seed)
    if Path(name).exists():
        raise RouterError(f"'{name}' is a path; load saved routers with tierroute.artifact")
    raise RouterError(
        f"unknown router '{name}'; use one of {', '.join(BUILTIN)} or the folder of a saved router"
    )
