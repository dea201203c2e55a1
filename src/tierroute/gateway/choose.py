"""Several models in one tier: which of them answers a request.

The policy picks a tier; when that tier lists several models, each request goes to the one
with the best expected quality per dollar,

    argmax_m  P(m answers x well) - lambda * cost(m, x)

and the others follow it as the tier's fallbacks, best first, before the next tier.

P(m answers x well) starts from a prior p0(m, x), the first of:
1. `tasks: {code: 0.9}`: the operator's estimate for prompts the tagger tags with that task
   (then `domains: {medical: 0.8}`, likewise for the domain tag);
2. `router_model`: the factor router's `model_probabilities` column for a model it was
   trained on (per prompt);
3. `prior`: the operator's estimate for any prompt;
4. the tier's prior: the mean p0 of the tier's models that have one of the above, else
   0.5 for the smallest tier up to 0.9 for the largest.
It then learns from the verdicts on the model's answers (shadow judgements and ratings,
each in [0, 1]), shrunk towards p0 by `prior_strength` pseudo-verdicts: first by the
model's verdicts on other tasks, then by those on the prompt's own task,

    p1 = (k p0 + s_other) / (k + n_other),   P = (k p1 + s_task) / (k + n_task).

Sums and counts are order-free, so a changed rating is a revision, and the state is
rebuilt from the ledger's rows, judgements and feedback at start-up: a restart keeps it.

cost(m, x) is the model's price for the prompt (~4 characters a token) plus max_tokens of
output. lambda (`gateway.choose.lambda_per_usd`, quality points a dollar is worth) is
configured, or with a controller budget 1 / (the budget per request at the current rate):
spending a request's whole budget then costs one point of quality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tierroute.errors import ConfigError

if TYPE_CHECKING:
    from tierroute.gateway.settings import GatewaySettings, TierSpec
    from tierroute.ledger import Ledger
    from tierroute.routers.base import BaseRouter
    from tierroute.routers.factor import FactorRouter

ALL = "*"  # the bucket of every verdict on a model, whatever the task
DEFAULT_LAMBDA = 10.0


@dataclass(frozen=True)
class ChooseConfig:
    """`gateway.choose`: how a tier of several models picks one."""

    # Quality points a dollar is worth; None: from the controller's budget when it has one.
    lambda_per_usd: float | None = None
    prior_strength: float = 5.0  # pseudo-verdicts a prior is worth
    history_days: float = 30.0  # verdicts older than this are not restored at start-up

    def __post_init__(self) -> None:
        lam = self.lambda_per_usd
        if lam is not None and not (math.isfinite(lam) and 0 <= lam <= 1e9):
            raise ConfigError("choose.lambda_per_usd must be within [0, 1e9]")
        if not (math.isfinite(self.prior_strength) and 0 < self.prior_strength <= 1e6):
            raise ConfigError("choose.prior_strength must be within (0, 1e6]")
        if not (math.isfinite(self.history_days) and 0 <= self.history_days <= 3650):
            raise ConfigError("choose.history_days must be within [0, 3650]")


def shrink(prior: float, strength: float, total: float, n: float) -> float:
    """The mean of `n` verdicts summing to `total`, with `strength` pseudo-verdicts at `prior`."""
    return (strength * prior + total) / (strength + n)


@dataclass
class Abilities:
    """Verdict sums and counts per (model key, task), and for the model over all tasks."""

    strength: float = 5.0
    _sums: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # -> [n, total]

    def observe(self, key: str, task: str, rating: float, previous: float | None = None) -> None:
        """A verdict on one answer of `key`; with `previous`, it replaces that one."""
        for bucket in ((key, task), (key, ALL)):
            n_total = self._sums.setdefault(bucket, [0.0, 0.0])
            if previous is None:
                n_total[0] += 1
                n_total[1] += rating
            else:
                n_total[1] += rating - previous

    def counts(self, key: str, task: str) -> tuple[float, float]:
        n, total = self._sums.get((key, task), (0.0, 0.0))
        return n, total

    def estimate(self, key: str, task: str, prior: float) -> tuple[float, int]:
        """P(key answers a prompt of `task` well) and the number of verdicts behind it."""
        n_all, s_all = self.counts(key, ALL)
        n_task, s_task = self.counts(key, task) if task != ALL else (0.0, 0.0)
        p1 = shrink(prior, self.strength, s_all - s_task, n_all - n_task)
        return shrink(p1, self.strength, s_task, n_task), int(n_all)


@dataclass(frozen=True)
class Candidate:
    key: str
    p: float  # P(answers well)
    cost: float  # USD, estimated
    value: float  # p - lambda * cost
    basis: str  # where p0 came from, and the verdicts behind P


@dataclass(frozen=True)
class Pick:
    tier: str
    ranked: tuple[Candidate, ...]  # best first
    lam: float

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.ranked]

    def note(self) -> str:
        """For the reason header: the chosen model, why, and the runner-up."""
        best = self.ranked[0]
        text = (
            f"model {best.key}: P {best.p:.2f} ({best.basis}) - {self.lam:g}/USD x "
            f"${best.cost:.6f} = {best.value:.3f}"
        )
        if len(self.ranked) > 1:
            runner = self.ranked[1]
            text += f", over {runner.key} {runner.value:.3f} (P {runner.p:.2f})"
        return text


def find_factor(router: BaseRouter) -> FactorRouter | None:
    """The factor router a serving router is built on (a rule prior or a learned
    correction wraps it as `.base`), if any."""
    from tierroute.routers.factor import FactorRouter

    seen: Any = router
    for _ in range(8):
        if isinstance(seen, FactorRouter):
            return seen
        seen = getattr(seen, "base", None)
        if seen is None:
            return None
    return None


class ModelChooser:
    """Ranks the models of a tier of several for one request, and learns their abilities."""

    def __init__(
        self,
        settings: GatewaySettings,
        router: BaseRouter,
        config: ChooseConfig | None = None,
        budget_per_request: Callable[[], float | None] | None = None,
    ) -> None:
        self.settings = settings
        self.config = config or ChooseConfig()
        self.budget_per_request = budget_per_request
        self.abilities = Abilities(self.config.prior_strength)
        self._factor: FactorRouter | None = None
        self._columns: dict[str, int] = {}
        self.set_router(router)

    @property
    def multi(self) -> list[TierSpec]:
        return [s for s in self.settings.tiers if s.models]

    def set_router(self, router: BaseRouter) -> None:
        """Use `router`'s factor model for the models mapped to its columns; a mapping the
        router cannot serve is a config error, at start-up rather than per request."""
        from tierroute.data import canonical_model

        wanted = [m for s in self.multi for m in s.models if m.router_model]
        factor = find_factor(router)
        if wanted and factor is None:
            raise ConfigError(
                f"{wanted[0].key} sets router_model, which needs a factor router "
                f"(default, or a saved mf/irt router); '{self.settings.router}' has none"
            )
        columns: dict[str, int] = {}
        if factor is not None and factor.models_ is not None:
            for m in wanted:
                assert m.router_model is not None
                name = canonical_model(m.router_model)
                if name not in factor.models_:
                    raise ConfigError(
                        f"{m.key}: router_model '{m.router_model}' is not a model the router "
                        f"was trained on; it knows: {', '.join(factor.models_)}"
                    )
                columns[m.key] = factor.models_.index(name)
        self._factor, self._columns = (factor if columns else None), columns

    # ------------------------------------------------------------------ deciding

    def needs_probabilities(self, chain: Sequence[str]) -> bool:
        return any(m.key in self._columns for t in chain for m in self.settings.spec(t).models)

    def probabilities(self, text: str) -> dict[str, float]:
        """P(answers well) from the factor router, per model key mapped to a column.
        Runs the encoder: call it off the event loop."""
        if self._factor is None:
            return {}
        row = self._factor.model_probabilities([text])[0]
        return {key: float(row[col]) for key, col in self._columns.items()}

    def lam(self) -> float:
        if self.config.lambda_per_usd is not None:
            return self.config.lambda_per_usd
        budget = self.budget_per_request() if self.budget_per_request else None
        if budget is not None and budget > 0:
            return 1.0 / budget
        return DEFAULT_LAMBDA

    def _tier_prior(self, tier: TierSpec) -> float:
        names = [s.name for s in self.settings.tiers]
        i, n = names.index(tier.name), len(names)
        return 0.5 + 0.4 * i / max(1, n - 1)

    def _prior(
        self, model: TierSpec, tags: Mapping[str, str], probs: Mapping[str, float]
    ) -> tuple[float, str] | None:
        task, domain = tags.get("task", ALL), tags.get("domain", ALL)
        if task in model.tasks:
            return model.tasks[task], f"prior for task={task}"
        if domain in model.domains:
            return model.domains[domain], f"prior for domain={domain}"
        if model.key in probs:
            return probs[model.key], f"router: {model.router_model}"
        if model.prior is not None:
            return model.prior, "prior"
        return None

    def rank(
        self,
        tier: TierSpec,
        tags: Mapping[str, str],
        probs: Mapping[str, float],
        prompt_tokens: int,
        max_tokens: int,
        max_cost_usd: float | None = None,
        slow: Collection[str] = (),
    ) -> Pick:
        """The tier's models, best value first; those whose estimated cost breaks the
        request's cost cap (`max_cost_usd`), or whose latency breaks its budget (`slow`,
        by key), after those that keep both."""
        task = tags.get("task", ALL)
        lam = self.lam()
        own = {m.key: self._prior(m, tags, probs) for m in tier.models}
        known = [p for p, _ in filter(None, own.values())]
        fallback = sum(known) / len(known) if known else self._tier_prior(tier)
        candidates = []
        for m in tier.models:
            p0, basis = own[m.key] or (fallback, "tier prior")
            p, n = self.abilities.estimate(m.key, task, p0)
            if n:
                basis += f", {n} verdicts"
            cost = m.tier.cost(prompt_tokens, max_tokens)
            candidates.append(Candidate(m.key, p, cost, p - lam * cost, basis))
        # Ties go to the earlier model in the config (a stable sort).
        cap = math.inf if max_cost_usd is None else max_cost_usd
        ranked = sorted(candidates, key=lambda c: (c.cost > cap or c.key in slow, -c.value))
        return Pick(tier.name, tuple(ranked), lam)

    def expand(
        self,
        chain: Sequence[str],
        tags: Mapping[str, str],
        probs: Mapping[str, float],
        prompt_tokens: int,
        max_tokens: int,
        max_cost_usd: float | None = None,
        slow: Collection[str] = (),
    ) -> tuple[list[str], Pick | None]:
        """The fallback chain with each tier of several models replaced by its models,
        best first; and the pick for the first such tier, for the reason."""
        out: list[str] = []
        first: Pick | None = None
        for name in chain:
            spec = self.settings.spec(name)
            if not spec.models or spec.model_name:
                out.append(name)
                continue
            pick = self.rank(spec, tags, probs, prompt_tokens, max_tokens, max_cost_usd, slow)
            first = first or pick
            out.extend(pick.keys)
        return out, first

    # ------------------------------------------------------------------ learning

    def learns(self, key: str | None) -> bool:
        return key is not None and any(m.key == key for s in self.multi for m in s.models)

    def observe(
        self, key: str, tags: Mapping[str, str], rating: float, previous: float | None = None
    ) -> None:
        """A shadow verdict or a rating of an answer `key` gave."""
        if self.learns(key):
            self.abilities.observe(key, tags.get("task", ALL), rating, previous)

    def restore(self, ledger: Ledger, now: float) -> int:
        """Rebuild the abilities from the ledger's judgements and ratings of the last
        `history_days` (the ledger keeps a rater's last rating of a request); returns how
        many verdicts it found on this tier's models."""
        since = now - self.config.history_days * 86400
        rows = {row.id: row for row in ledger.rows(since=since)}
        verdicts = [(rid, v) for rid, _, v in ledger.judgements(since=since) if v is not None]
        verdicts += [(rid, rating) for rid, _, rating in ledger.feedback_since(since)]
        n = 0
        for rid, value in verdicts:
            row = rows.get(rid)
            key = self.answered_by(row.tier, row.model, row.fallback_chain) if row else None
            if row is not None and key is not None:
                self.observe(key, row.tags, value)
                n += 1
        return n

    def answered_by(self, tier: str, model: str, chain: Sequence[str]) -> str | None:
        """The model key that answered a ledger row: the last one tried of its tier and model."""
        for key in reversed(chain):
            if not self.learns(key):
                continue
            spec = self.settings.spec(key)
            if spec.tier.name == tier and spec.tier.model == model:
                return key
        return None


def pick_offline(
    settings: GatewaySettings, router: BaseRouter, tier: str, tags: Mapping[str, str], text: str
) -> Pick | None:
    """The model `tierroute route` names for a routing text sent to `tier`: the gateway's
    choice before any verdict (it learns from those while serving); None for a tier of
    one model."""
    from tierroute.conversation import estimate_tokens

    spec = settings.spec(tier)
    if not spec.models:
        return None
    chooser = ModelChooser(settings, router, settings.choose)
    probs = chooser.probabilities(text) if chooser.needs_probabilities([tier]) else {}
    return chooser.rank(spec, tags, probs, estimate_tokens(text), settings.max_tokens_default)
