"""The router protocol and the base class every router builds on.

A router answers one question: the probability, in [0, 1], that the small tier is not
enough for this request. `score_texts` is the batched form over routing texts (see
`tierroute.conversation`); `score` and `explain` take a whole conversation.
Learned routers follow scikit-learn's conventions: the constructor only stores its
parameters, `fit` learns and returns self, learned state ends in `_`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from tierroute.conversation import routing_text
from tierroute.data import Outcomes
from tierroute.errors import RouterError
from tierroute.types import Explanation, Messages

Scores = npt.NDArray[np.float64]


def sigmoid(z: npt.ArrayLike) -> Scores:
    """The logistic function, in the tanh form that never overflows for large |z|."""
    out: Scores = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))
    return out


def logit(p: npt.ArrayLike) -> Scores:
    """The inverse of `sigmoid`, clipped so that 0 and 1 map to finite values."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    out: Scores = np.log(q / (1 - q))
    return out


@runtime_checkable
class Router(Protocol):
    kind: ClassVar[str]

    def score(self, messages: Messages) -> float: ...

    def explain(self, messages: Messages) -> Explanation: ...

    def score_texts(self, texts: Sequence[str]) -> Scores: ...


class BaseRouter(ABC):
    """Shared plumbing: conversations become routing texts; subclasses score texts."""

    kind: ClassVar[str] = "base"
    learned: ClassVar[bool] = False

    def score(self, messages: Messages) -> float:
        return float(self.score_texts([routing_text(messages)])[0])

    def explain(self, messages: Messages) -> Explanation:
        return self.explain_text(routing_text(messages))

    def explain_text(self, text: str) -> Explanation:
        return Explanation(score=float(self.score_texts([text])[0]))

    def explain_texts(self, texts: Sequence[str]) -> list[Explanation]:
        """`explain_text` of each text; routers whose work vectorises override it (the
        gateway's routing micro-batch explains its texts in one call)."""
        return [self.explain_text(text) for text in texts]

    @abstractmethod
    def score_texts(self, texts: Sequence[str]) -> Scores:
        """Scores in [0, 1] for a batch of routing texts."""

    # Learned routers override these.
    def fit(self, texts: Sequence[str], labels: npt.ArrayLike) -> BaseRouter:
        return self

    def fit_outcomes(self, outcomes: Outcomes) -> BaseRouter:
        """Learn from outcome rows. Pair routers need only the pair's labels; routers that
        learn from every model's scores (the factor router) override this."""
        return self.fit(outcomes.prompts, outcomes.labels)

    def get_params(self) -> dict[str, Any]:
        return {}

    def get_state(self) -> dict[str, npt.NDArray[Any]]:
        return {}

    def set_state(self, state: dict[str, npt.NDArray[Any]]) -> None:
        return None

    def _check_fitted(self, attr: str) -> None:
        if getattr(self, attr, None) is None:
            raise RouterError(
                f"the {self.kind} router has not been trained; run `tierroute train` first "
                "or call fit()"
            )
