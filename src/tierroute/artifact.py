"""Saved routers: a versioned folder a router can be trained into and loaded from.

router.json     format version, kind, parameters, embedding model, what it was
                trained on (file, sha256, model pair, row count), calibration
weights.npz     learned state (numpy arrays only: nothing is pickled)
train_ids.txt   the ids of the training rows, so eval can refuse to test on them
prototypes.yaml the tagger's prototypes, when the router uses tag features
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tierroute import __version__
from tierroute.encoder import Encoder, TextEncoder
from tierroute.errors import ArtifactError
from tierroute.routers.base import BaseRouter

FORMAT = "tierroute-router"
FORMAT_VERSION = 1


@dataclass
class Artifact:
    path: Path
    router: BaseRouter
    meta: dict[str, Any]
    train_ids: frozenset[str] = field(default_factory=frozenset)

    @property
    def threshold(self) -> float | None:
        return _threshold(self.meta)

    def overlap(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if i in self.train_ids]

    def write_meta(self) -> None:
        tmp = self.path / "router.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        tmp.replace(self.path / "router.json")


def save_router(
    router: BaseRouter, out: str | Path, trained_on: dict[str, Any], train_ids: Sequence[str]
) -> Artifact:
    path = Path(out)
    if path.exists() and any(path.iterdir()) and not (path / "router.json").exists():
        raise ArtifactError(f"'{path}' exists and is not a router folder; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    encoder: Encoder | None = getattr(router, "encoder", None)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": router.kind,
        "params": router.get_params(),
        "embed_model": encoder.model_id if encoder is not None else None,
        "trained_on": trained_on,
        "calibration": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tierroute_version": __version__,
    }
    np.savez_compressed(path / "weights.npz", allow_pickle=False, **router.get_state())
    (path / "train_ids.txt").write_text("\n".join(train_ids) + "\n")
    tagger = getattr(router, "tagger", None)
    if tagger is not None:
        doc = {
            g.name: {
                "min_similarity": g.min_similarity,
                "min_margin": g.min_margin,
                "fallback": g.fallback,
                "classes": {c: [u for k, u in g.utterances if k == c] for c in g.classes},
            }
            for g in tagger.groups
        }
        (path / "prototypes.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    artifact = Artifact(path=path, router=router, meta=meta, train_ids=frozenset(train_ids))
    artifact.write_meta()
    return artifact


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / "router.json"
    if not meta_file.is_file():
        raise ArtifactError(
            f"'{path}' is not a saved router (no router.json); create one with `tierroute train`"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"'{meta_file}' is not valid JSON; retrain the router") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"'{meta_file}' is not a tierroute router file")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"router '{path}' has format version {version}, this tierroute reads version "
            f"{FORMAT_VERSION}; retrain it with `tierroute train`"
        )
    return meta


def load_router(path: str | Path, encoder_factory: Callable[[], Encoder] = TextEncoder) -> Artifact:
    from tierroute.routers.knn import KnnRouter
    from tierroute.routers.logreg import LogRegRouter
    from tierroute.tagger import Tagger, load_prototypes

    folder = Path(path)
    meta = read_meta(folder)
    encoder_factory = _serving_factory(meta, encoder_factory)
    kind = meta.get("kind")
    params = dict(meta.get("params") or {})
    router: BaseRouter
    if kind == "knn":
        router = KnnRouter(encoder_factory(), **params)
    elif kind == "logreg":
        encoder = encoder_factory()
        tagger = None
        if params.pop("uses_tags", False):
            tagger = Tagger(encoder, load_prototypes(folder / "prototypes.yaml"))
        params.setdefault("features", "all")  # saved before the choice existed
        router = LogRegRouter(encoder, tagger, **params)
    elif kind == "mf":
        from tierroute.routers.factor import FactorRouter

        router = FactorRouter(encoder_factory(), **params)
    elif kind == "bert":
        from tierroute.routers.finetuned import FineTunedRouter

        router = FineTunedRouter(**params)
    elif kind == "residual":
        from tierroute.routers.residual import ResidualRouter

        base, _ = open_router(str(params.pop("base")), encoder_factory)
        encoder = getattr(base, "encoder", None) or encoder_factory()
        router = ResidualRouter(base, str(meta["params"]["base"]), encoder, **params)
    else:
        raise ArtifactError(f"router '{folder}' is of kind '{kind}', which cannot be loaded")
    embed_model = meta.get("embed_model")
    encoder_now: Encoder | None = getattr(router, "encoder", None)
    allowed = {embed_model, meta.get("embed_served")}
    if embed_model and encoder_now is not None and encoder_now.model_id not in allowed:
        raise ArtifactError(
            f"router '{folder}' was trained on embeddings of {embed_model}, but the installed "
            f"model is {encoder_now.model_id}; retrain it"
        )
    try:
        with np.load(folder / "weights.npz", allow_pickle=False) as npz:
            router.set_state({k: npz[k] for k in npz.files})
    except (OSError, KeyError, ValueError) as exc:
        raise ArtifactError(
            f"cannot read the weights of router '{folder}' ({exc}); retrain it"
        ) from None
    ids_file = folder / "train_ids.txt"
    ids = frozenset(ids_file.read_text().split("\n")) - {""} if ids_file.exists() else frozenset()
    if meta.get("rule_prior"):
        router = _with_rule_prior(router, folder, meta["rule_prior"], encoder_factory)
    return Artifact(path=folder, router=router, meta=meta, train_ids=ids)


def _embedding_settings(model_id: str) -> tuple[int, str] | None:
    """(max tokens, precision) from a model id such as `NAME@digest/len256/int8-rows`."""
    parts = model_id.rsplit("/", 2)
    if len(parts) != 3 or not parts[1].startswith("len") or not parts[1][3:].isdigit():
        return None
    return int(parts[1][3:]), parts[2].removesuffix("-rows")


def _serving_factory(
    meta: dict[str, Any], encoder_factory: Callable[[], Encoder]
) -> Callable[[], Encoder]:
    """The encoder factory a saved router is served with.

    A router reads the embeddings it was trained on (`embed_model`), or those its folder
    says its quality was checked on (`embed_served`, e.g. the same weights at int8:
    about twice as fast; the default router's CARD.md has the comparison).
    TIERROUTE_EMBED_PRECISION / TIERROUTE_EMBED_MAX_TOKENS, when set, choose instead, and
    the check after loading refuses embeddings the router knows nothing of."""
    from tierroute.embed import Embedder

    wanted = meta.get("embed_served") or meta.get("embed_model")
    settings = _embedding_settings(wanted) if isinstance(wanted, str) else None
    if settings is None:
        return encoder_factory
    max_tokens, precision = settings
    made: list[Encoder] = []

    def factory() -> Encoder:
        encoder = encoder_factory()
        embedder = getattr(encoder, "embedder", None)
        if not isinstance(encoder, TextEncoder) or not isinstance(embedder, Embedder):
            return encoder  # a caller's own encoder: the model id check decides
        if embedder.overrides is not None:
            return encoder
        env = os.environ
        tokens = max_tokens if "TIERROUTE_EMBED_MAX_TOKENS" not in env else embedder.max_length
        at = precision if "TIERROUTE_EMBED_PRECISION" not in env else embedder.precision
        if (tokens, at) == (embedder.max_length, embedder.precision):
            return encoder
        if not made:  # one encoder per loaded router, shared by its parts (rule prior)
            twin = Embedder(
                embedder.model_dir,
                max_length=tokens,
                batch_size=embedder.batch_size,
                token_budget=embedder.token_budget,
                threads=embedder.threads,
                precision=at,
            )
            # a static table is faster than the disk cache's lookup
            cache = None if at == "static" else encoder.disk_cache
            made.append(TextEncoder(twin, cache, encoder.memo_size))
        return made[0]

    return factory


def _with_rule_prior(
    router: BaseRouter, folder: Path, prior: Any, encoder_factory: Callable[[], Encoder]
) -> BaseRouter:
    """The saved router with a rule set on top. `rule_prior` in router.json:
    {"rules": "builtin" or a rules file beside router.json, "weight": w}."""
    from tierroute.routers.prior import RulePriorRouter
    from tierroute.routers.rules import RulesRouter, load_rules
    from tierroute.tagger import Tagger

    if not isinstance(prior, dict) or not isinstance(prior.get("weight"), int | float):
        raise ArtifactError(
            f"router '{folder}' has a bad rule_prior {prior!r}; "
            'it must look like {"rules": "builtin", "weight": 0.25}'
        )
    name = str(prior.get("rules", "builtin"))
    rules = load_rules(None if name == "builtin" else folder / name)
    encoder = getattr(router, "encoder", None) or encoder_factory()
    tagger = Tagger(encoder) if rules.uses_tags else None
    return RulePriorRouter(router, RulesRouter(rules, tagger), float(prior["weight"]))


# Routers that ship with the package, by name: the default (MiniLM embeddings) and the
# same recipe on the static table distilled from MiniLM (static_embed.py), which routes a
# fresh prompt in microseconds; each folder's CARD.md says how it was made and what it scores.
SHIPPED = {"default": "default_router", "default-static": "default_router_static"}


def default_router_dir(name: str = "default") -> Path:
    """The folder of a router that ships with the package (a name of SHIPPED)."""
    from importlib.resources import files

    return Path(str(files("tierroute") / "resources" / SHIPPED[name]))


def _threshold(meta: dict[str, Any]) -> float | None:
    cal = meta.get("calibration")
    return float(cal["threshold"]) if isinstance(cal, dict) and cal else None


def _saved_folder(spec: str) -> Path | None:
    """The folder of router `spec` when it is a saved one (a SHIPPED name or a path)."""
    folder = default_router_dir(spec) if spec in SHIPPED else Path(spec)
    return folder if folder.is_dir() else None


def calibrated_threshold(spec: str) -> float | None:
    """The calibrated threshold of router `spec` (as `open_router` takes it), read from
    router.json without loading the router; None for built-in or uncalibrated routers."""
    folder = _saved_folder(spec)
    return None if folder is None else _threshold(read_meta(folder))


def open_router(
    spec: str, encoder_factory: Callable[[], Encoder] = TextEncoder
) -> tuple[BaseRouter, Artifact | None]:
    """A router by built-in name, `default`, or saved folder; with its artifact if saved."""
    from tierroute.routers import make_router

    folder = _saved_folder(spec)
    if folder is not None:
        artifact = load_router(folder, encoder_factory)
        return artifact.router, artifact
    return make_router(spec, encoder_factory), None
