"""The `tierroute` command line: eval, train, calibrate, route.

The only place that parses arguments, configures logging or prints. Every error a user
can cause ends as one line on stderr and exit code 2, never a traceback: bad numbers are
refused by the argument types, and `main` turns tierroute's errors, files or folders that
cannot be used (OSError) and files that are not text into that line.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tierroute.errors import DataError, InputError, TierrouteError

PROG = "tierroute"


def _whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argument type: a whole number in [minimum, maximum], else a usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"{minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range; use {allowed}")
        return value

    return parse


def _amount(text: str) -> float:
    """An argument type: a finite number of at least 0 (a price, a weight)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of at least 0")
    return value


def _output_file(text: str) -> str:
    """An argument type: a file to write, whose folder exists (checked before any work)."""
    folder = Path(text).parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder '{folder}' of '{text}' does not exist")
    return text


def _encoder_factory(batch: bool) -> Callable[[], Any]:
    """One shared encoder per command; data files use the on-disk embedding cache."""
    from tierroute.embed import Embedder, EmbeddingCache
    from tierroute.encoder import TextEncoder

    shared: list[Any] = []

    def factory() -> Any:
        if not shared:
            # a static table is faster than the disk cache's lookup
            if batch and Embedder().precision != "static":
                shared.append(TextEncoder(Embedder(), EmbeddingCache()))
            else:
                shared.append(TextEncoder(Embedder()))
        return shared[0]

    return factory


def _target(args: argparse.Namespace) -> Any:
    from tierroute.eval.harness import Target

    if args.target_large_share is not None:
        return Target(large_share=args.target_large_share)
    return Target(quality=args.target_quality if args.target_quality is not None else 0.8)


def _load_data(args: argparse.Namespace) -> Any:
    from tierroute.data import concat_outcomes, load_outcomes

    return concat_outcomes(
        [load_outcomes(path, args.small, args.large, args.where or ()) for path in args.data]
    )


def _data_names(args: argparse.Namespace) -> list[str]:
    """The outcome files' names, as an artifact records what it was trained or calibrated on."""
    return [Path(path).name for path in args.data]


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data",
        required=required,
        action="append",
        help="outcome file (JSON Lines); repeat to use several files as one set",
    )
    p.add_argument("--small", required=required, help="name of the small model in the file")
    p.add_argument("--large", required=required, help="name of the large model in the file")
    p.add_argument(
        "--where",
        action="append",
        metavar="FIELD=VALUE",
        help="keep only rows whose field has this value, e.g. meta.routerdc_split=test",
    )


def _add_target_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--target-large-share",
        type=float,
        metavar="S",
        help="calibrate to send this share of calls to the large model",
    )
    group.add_argument(
        "--target-quality",
        type=float,
        metavar="PGR",
        help="calibrate to keep this share of the large model's quality gain (default 0.8)",
    )


def _check_unseen(artifact: Any, o: Any, exclude: bool) -> Any:
    """Refuse to measure a learned router on its own training rows."""
    seen = artifact.overlap(o.ids)
    trained = artifact.meta.get("trained_on") or {}
    if not seen:
        return o
    if exclude:
        keep = [i for i, row_id in enumerate(o.ids) if row_id not in artifact.train_ids]
        if not keep:
            raise DataError(f"every row of '{o.path}' was used to train '{artifact.path}'")
        print(f"excluded {len(seen):,} rows the router was trained on", file=sys.stderr)
        return o.subset(keep)
    same = trained.get("data_hash") == o.data_hash
    raise DataError(
        f"{len(seen):,} of these {len(o):,} rows trained router '{artifact.path}'"
        + (" (same file)" if same else "")
        + "; evaluate on other rows (--where) or pass --exclude-trained"
    )


def _resolve_router(spec: str, batch: bool) -> tuple[Any, Any]:
    """(router, artifact or None) for a built-in name, 'default', or a saved folder."""
    from tierroute.artifact import open_router

    return open_router(spec, _encoder_factory(batch))


# ---------------------------------------------------------------- eval


def _fmt_pct(x: float) -> str:
    return "   n/a" if x != x else f"{x:6.1%}"


def _print_eval(ev: Any, savings: Any) -> None:
    o = ev.outcomes
    cv = f"grouped {ev.folds}-fold CV by {ev.cv_group}" if ev.cv_group else f"{ev.folds}-fold CV"
    print(f"{o.path}: {len(o):,} rows ({o.skipped} without both scores skipped)")
    print(f"small {o.small_model}  ->  large {o.large_model};  {cv}")
    print()
    print(f"{'router':<46} {'APGR':>6} {'CPT50':>7} {'CPT80':>7} {'AUC':>7}")
    rows = [(ev.router, ev.figures)]
    rows += [(name, ev.baselines[name]) for name in ("random", "oracle")]
    for name, fig in rows:
        print(
            f"{name:<46} {fig['apgr']:6.3f} {_fmt_pct(fig['cpt50'])} "
            f"{_fmt_pct(fig['cpt80'])} {fig['auc']:7.4f}"
        )
    for name, fig in ev.published.items():
        cpt80 = _fmt_pct(fig["cpt80"]) if "cpt80" in fig else "      -"
        print(f"{name:<46} {fig['apgr']:6.3f} {_fmt_pct(fig['cpt50'])} {cpt80} {'-':>7}")
    for name in ("all-small", "all-large"):
        b = ev.baselines[name]
        cost = f", ${b['cost_per_query']:.6f}/query" if "cost_per_query" in b else ""
        model = o.small_model if name == "all-small" else o.large_model
        print(f"{name + ' (' + model.split('/')[-1] + ')':<46} quality {b['quality']:.4f}{cost}")
    op = ev.operating
    cost = f", ${op['cost_per_query']:.6f}/query" if "cost_per_query" in op else ""
    print()
    where = "" if ev.target.fixed is not None else ", calibrated on the other folds"
    print(
        f"at the calibrated threshold (target {ev.target.describe()}{where}): "
        f"large share {op['large_share']:.1%}, quality {op['quality']:.4f}, "
        f"PGR {op['pgr']:.3f}{cost}"
    )
    print()
    for line in savings.lines():
        print(line)


def cmd_eval(args: argparse.Namespace) -> int:
    from tierroute.artifact import SHIPPED
    from tierroute.eval.harness import Target, evaluate
    from tierroute.eval.savings import Savings
    from tierroute.routers import BUILTIN, LEARNED, make_router

    if args.models == "all":
        return cmd_eval_all_models(args)
    if not (args.data and args.small and args.large):
        raise InputError("eval needs --data, --small and --large (or --models all)")
    o = _load_data(args)
    target = _target(args)
    name = args.router
    factory = _encoder_factory(batch=True)
    if name in LEARNED:
        ev = evaluate(
            name,
            o,
            factory=lambda: make_router(name, factory, args.seed),
            cv_group=args.cv_group,
            n_folds=args.folds,
            seed=args.seed,
            target=target,
        )
    else:
        router, artifact = _resolve_router(name, batch=True)
        if artifact is not None:
            o = _check_unseen(artifact, o, args.exclude_trained)
            name = f"{artifact.meta['kind']} ({artifact.path})"
            explicit = args.target_large_share is not None or args.target_quality is not None
            if artifact.threshold is not None and not explicit:
                target = Target(fixed=artifact.threshold)
        elif name not in BUILTIN and name not in SHIPPED:
            raise InputError(f"unknown router '{name}'")
        ev = evaluate(
            name,
            o,
            fixed=router,
            cv_group=args.cv_group,
            n_folds=args.folds,
            seed=args.seed,
            target=target,
        )

    price_small, price_large = args.price_small, args.price_large
    if o.has_cost and price_small is None and price_large is None:
        price_small, price_large = float(o.small_cost.mean()), float(o.large_cost.mean())
    elif args.tiers:
        from tierroute.config import load_policy

        policy = load_policy(args.tiers)
        tokens_in = sum(len(p) for p in o.prompts) / len(o) / 4  # ~4 characters a token
        small_tier, large_tier = policy.tiers[0], policy.tiers[-1]
        price_small = small_tier.cost(int(tokens_in), args.output_tokens)
        price_large = large_tier.cost(int(tokens_in), args.output_tokens)
    savings = Savings(
        queries_per_day=args.queries_per_day,
        price_small=price_small if price_small is not None else 0.001,
        price_large=price_large if price_large is not None else 0.02,
        small_share=1.0 - ev.operating["large_share"],
    )
    _print_eval(ev, savings)
    if args.json:
        doc = ev.as_dict()
        doc["savings"] = savings.as_dict()
        Path(args.json).write_text(json.dumps(doc, indent=2, default=float) + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        from tierroute.eval.plot import plot_evaluation

        try:
            plot_evaluation(ev, args.plot, x=args.x)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        print(f"wrote {args.plot}")
    if args.scores_out:
        with open(args.scores_out, "w") as handle:
            for row_id, score in zip(o.ids, ev.scores, strict=True):
                handle.write(json.dumps({"id": row_id, "score": float(score)}) + "\n")
        print(f"wrote {args.scores_out}")
    return 0


def cmd_eval_all_models(args: argparse.Namespace) -> int:
    """Route among every model of each file; see tierroute.eval.nmodel."""
    from tierroute.eval.nmodel import (
        evaluate_nmodel,
        json_ready,
        load_tables,
        neighbour_cost,
        recipe_fitter,
        report_lines,
    )

    if not args.data:
        raise InputError("--models all needs --data FILE (repeat it for several files)")
    if args.small or args.large or args.where or args.router not in ("default", "irt", "mf"):
        raise InputError(
            "--models all routes among every model of each file with the factor router: "
            "drop --small, --large and --where, and use --router irt or mf"
        )
    encoder = _encoder_factory(batch=True)()
    fitter, cost_model = recipe_fitter(encoder, args.router), neighbour_cost(encoder)
    results = []
    for path in args.data:
        for table in load_tables(path):
            result = evaluate_nmodel(
                table, fitter, n_folds=args.folds, seed=args.seed, cost_model=cost_model
            )
            results.append(result)
            print("\n".join(report_lines(result)) + "\n", flush=True)
    if args.json:
        doc = {"router": args.router, "tables": [r.as_dict() for r in results]}
        Path(args.json).write_text(json.dumps(json_ready(doc), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        from tierroute.eval.plot import plot_nmodel

        for result in results:
            out = Path(args.plot)
            if len(results) > 1:
                slug = "".join(c if c.isalnum() else "-" for c in result.table.label).strip("-")
                out = out.with_name(f"{out.stem}-{slug}{out.suffix or '.png'}")
            plot_nmodel(result, out)
            print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- train


def cmd_train_from_ledger(args: argparse.Namespace) -> int:
    import hashlib

    from tierroute.artifact import open_router, save_router
    from tierroute.cli_ledger import open_ledger, target_of
    from tierroute.gateway.settings import load_settings
    from tierroute.learning import compare, ledger_labels, require_rows, split_by_time
    from tierroute.ledger import parse_since
    from tierroute.routers import make_router

    settings = load_settings(args.config)
    with open_ledger(target_of(args)) as ledger:
        data = ledger_labels(
            ledger, settings.tiers[-1].name, parse_since(args.since) if args.since else None
        )
    require_rows(data)
    train, test = split_by_time(data)
    factory = _encoder_factory(batch=True)
    new = make_router(args.router, factory, args.seed)
    new.fit([data.prompts[i] for i in train], data.labels[train])
    current, _ = open_router(args.current or settings.router, factory)
    new_auc, current_auc = compare(new, current, data, test)
    print(
        f"{len(data.ids)} labelled requests from {ledger.location}: trained {args.router} on the "
        f"older {len(train)}, compared on the newest {len(test)}"
    )
    print(
        f"held-out ROC AUC: new {args.router} {new_auc:.3f}, current "
        f"{args.current or settings.router} {current_auc:.3f}"
    )
    if new_auc <= current_auc:
        print("not promoted: the new router does not beat the current one")
        return 0
    trained_on = {
        "data": ledger.location,
        "data_hash": hashlib.sha256("\n".join(data.ids).encode()).hexdigest(),
        "source": "ledger",
        "rows": len(train),
        "held_out_auc": new_auc,
        "current_auc": current_auc,
    }
    save_router(new, args.out, trained_on, [data.ids[i] for i in train])
    print(f"promoted: wrote {args.out} (point the gateway's `router:` at it)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tierroute.artifact import save_router
    from tierroute.routers import LEARNED, make_router

    if args.from_ledger:
        return cmd_train_from_ledger(args)
    missing = [f"--{n}" for n in ("data", "small", "large") if not getattr(args, n)]
    if missing:
        raise InputError(f"train needs {', '.join(missing)} (or --from-ledger)")
    o = _load_data(args)
    start = time.perf_counter()
    router = make_router(args.router, _encoder_factory(batch=True), args.seed)
    if not router.learned:
        raise InputError(f"the {args.router} router does not learn; train one of {LEARNED}")
    router.fit_outcomes(o)
    trained_on = {
        "data": _data_names(args),
        "data_hash": o.data_hash,
        "small": o.small_model,
        "large": o.large_model,
        "where": args.where or [],
        "rows": len(o),
        "positive_rate": float(o.labels.mean()),
    }
    artifact = save_router(router, args.out, trained_on, o.ids)
    if args.rule_prior is not None:
        artifact.meta["rule_prior"] = {"rules": "builtin", "weight": args.rule_prior}
        artifact.write_meta()
    print(
        f"trained {args.router} on {len(o):,} rows of {' + '.join(args.data)} "
        f"({o.labels.mean():.1%} needed the large model) in {time.perf_counter() - start:.1f}s"
    )
    print(f"wrote {artifact.path}/router.json, weights.npz, train_ids.txt")
    return 0


# ---------------------------------------------------------------- replay


def cmd_replay(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tierroute.gateway.settings import apply_calibration, load_settings
    from tierroute.learning import LearningConfig
    from tierroute.replay import replay, skip_prefixed

    o = skip_prefixed(_load_data(args), args.skip or ())
    settings = load_settings(args.config)
    router_spec = args.router or settings.router
    settings = replace(settings, router=router_spec)
    router, artifact = _resolve_router(router_spec, batch=True)
    if artifact is not None and artifact.threshold is not None:
        apply_calibration(settings, artifact.threshold)
    # The config's learning section if it has one, run at every checkpoint here.
    learning = replace(settings.learning or LearningConfig(), min_new_labels=0)
    print(f"replaying {len(o):,} rows of {' + '.join(args.data)} through the engine")

    def show(point: Any, fold: int | None) -> None:
        run = f"  [{point.run.outcome}: {point.run.reason}]" if point.run else "  [cold start]"
        where = "" if fold is None else f"fold {fold}  "
        print(
            f"{where}labels {point.labels:5d}  APGR {point.apgr:.3f}  "
            f"CPT(50%) {point.cpt50:.3f}{run}"
        )

    result = replay(
        o,
        settings,
        router,
        router_spec,
        learning,
        seed=args.seed,
        limit=args.limit,
        eval_size=args.eval_size,
        folds=args.folds,
        reveal=args.reveal,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        progress=show,
    )
    if result.folds:
        print(f"mean over {len(result.folds)} folds, each row evaluated once:")
        for point in result.points:
            print(f"labels {point.labels:5d}  APGR {point.apgr:.3f}  CPT(50%) {point.cpt50:.3f}")
    best = max(result.points[1:], key=lambda p: p.labels, default=result.points[0])
    print(
        f"on the {result.eval_rows} never-sent rows: random {result.random_apgr:.3f}, cold "
        f"{result.points[0].apgr:.3f}, after {best.labels} labels {best.apgr:.3f}, oracle "
        f"{result.oracle_apgr:.3f} ({result.traffic_rows} rows of traffic)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from tierroute.gateway.learner import rollback_stopped
    from tierroute.ledger import default_path

    folder = default_path(Path(args.data_dir) if args.data_dir else None).parent / "learned"
    print(rollback_stopped(folder))
    return 0


# ---------------------------------------------------------------- calibrate


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from tierroute.artifact import load_router
    from tierroute.eval.metrics import point_at_threshold, routing_curve

    artifact = load_router(args.router, _encoder_factory(batch=True))
    target = _target(args)
    o = _load_data(args)
    if target.large_share is None:
        o = _check_unseen(artifact, o, args.exclude_trained)
    elif artifact.overlap(o.ids):
        # A share target reads only the scores' distribution, never the labels, so the
        # training prompts serve; the expected quality printed below is in-sample.
        print("note: calibrating a large share on training rows; quality is in-sample")
    scores = artifact.router.score_texts(o.prompts)
    threshold = target.threshold(scores, o.small, o.large)
    curve = routing_curve(scores, o.small, o.large, o.small_cost, o.large_cost)
    i = point_at_threshold(curve, threshold)
    expected = {
        "large_share": float(curve.share[i]),
        "quality": float(curve.quality[i]),
        "pgr": float(curve.pgr[i]),
    }
    if curve.cost is not None:
        expected["cost_per_query"] = float(curve.cost[i])
    artifact.meta["calibration"] = {
        "threshold": threshold if np.isfinite(threshold) else 1.0,
        "target": target.describe(),
        "data": _data_names(args),
        "data_hash": o.data_hash,
        "where": args.where or [],
        "rows": len(o),
        "expected": expected,
    }
    artifact.write_meta()
    cost = f", ${expected['cost_per_query']:.6f}/query" if "cost_per_query" in expected else ""
    print(
        f"calibrated {artifact.path} to {target.describe()} on {len(o):,} rows: "
        f"threshold {threshold:.4f}"
    )
    print(
        f"expected: large share {expected['large_share']:.1%}, quality {expected['quality']:.4f}, "
        f"PGR {expected['pgr']:.3f}{cost}"
    )
    return 0


# ---------------------------------------------------------------- route


def cmd_route(args: argparse.Namespace) -> int:
    from tierroute.config import load_policy
    from tierroute.gateway.settings import load_settings

    if args.messages:
        try:
            messages = json.loads(Path(args.messages).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read messages from '{args.messages}': {exc}") from None
    else:
        if args.prompt is None or not args.prompt.strip():
            raise InputError(
                'the prompt is empty; pass the text to route, e.g. tierroute route "What is 2+2?"'
            )
        messages = [{"role": "user", "content": args.prompt}]
    start = time.perf_counter()
    if args.tiers:  # a bare tiers file, as before the gateway existed
        policy, router_spec = load_policy(args.tiers), args.router or "default"
    else:  # the gateway's config, so this prints what `serve --config` would do
        settings = load_settings(args.config)
        policy, router_spec = settings.policy, args.router or settings.router
    router, artifact = _resolve_router(router_spec, batch=False)
    if artifact is not None and artifact.threshold is not None:
        policy = policy.with_threshold(artifact.threshold)
    # Load the embedding model and tag prototypes now, so the time printed is that of
    # a decision in a running process rather than of start-up.
    policy.route(router, [{"role": "user", "content": "warm up"}])
    loaded = time.perf_counter()
    decision = policy.route(router, messages, args.priority)
    pick = None
    if not args.tiers:  # a tier of several models: which of them, as `serve` would start
        from tierroute.conversation import routing_text
        from tierroute.gateway.choose import pick_offline

        text = routing_text(messages)
        pick = pick_offline(settings, router, decision.tier.name, decision.tags, text)
    model = settings.spec(pick.keys[0]).tier.model if pick else decision.tier.model
    if args.json:
        print(
            json.dumps(
                {
                    "tier": decision.tier.name,
                    "model": model,
                    "score": round(decision.score, 6),
                    "reason": decision.reason,
                    "tags": dict(decision.tags),
                    **({"model_key": pick.keys[0], "model_choice": pick.note()} if pick else {}),
                    "decision_ms": round(decision.elapsed_ms, 3),
                    "load_ms": round((loaded - start) * 1000, 1),
                }
            )
        )
    else:
        print(f"tier    {decision.tier.name} ({model})")
        print(f"score   {decision.score:.4f}")
        print(f"reason  {decision.reason}")
        if pick is not None:
            print(f"choice  {pick.note()}")
        print(
            f"time    {decision.elapsed_ms:.1f} ms to decide "
            f"({(loaded - start) * 1000:.0f} ms to load the router)"
        )
    return 0


# ---------------------------------------------------------------- serve, report, config


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from tierroute.gateway.app import create_app
    from tierroute.gateway.build import build_parts
    from tierroute.gateway.server import run
    from tierroute.gateway.settings import load_settings
    from tierroute.logs import configure

    configure(args.log_format, logging.INFO)
    settings = load_settings(args.config)
    data_dir = Path(args.data_dir) if args.data_dir else None
    _one_blas_thread()
    # Claim the port, then build router, models and ledger, all before the server starts:
    # a port in use, a missing model or an unusable ledger is one line from `main`, where
    # inside the server's start-up it was a traceback and exit code 3.
    sock = _bind(args.host, args.port)
    try:
        from tierroute.backends.models import resolve_model

        for spec in (m for t in settings.tiers for m in t.targets):  # before any model loads
            if spec.kind == "local":
                resolve_model(spec.tier.model)
        parts = build_parts(settings, data_dir)
    except BaseException:
        sock.close()
        raise
    app = create_app(settings, lambda s: parts)
    tiers = ", ".join(f"{s.name}={s.kind}:{s.tier.model}" for s in settings.tiers)
    print(
        f"tierroute serve: {tiers}; router {settings.router}; http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    run(app, sock, args.log_level, settings.client_timeout_s)
    return 0


def _one_blas_thread() -> None:
    """numpy's OpenBLAS runs each matrix product on a thread per core. Routing's products
    are small (a micro-batch against the tagger's prototypes): on 2 cores those threads
    fought the event loop and the routing thread, and the product took 26x the CPU it
    takes on one thread (6.5 against 0.25 ms a batch of 32), most of a static-embedding
    route. Process-wide, so it is set here, by the command that owns the process."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it once the app is built)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(
            f"cannot listen on {host}:{port}: {exc.strerror}; stop whatever uses the port "
            "or pass another --port"
        ) from None
    return sock


def _pricing(config: str | None) -> Any:
    """Prices for rows written before the ledger recorded them: only from a config the user
    names, never from the built-in one (whose prices are not theirs)."""
    if config is None:
        return None
    from tierroute.gateway.settings import load_settings

    largest = load_settings(config).tiers[-1].tier

    def largest_cost(row: Any) -> float:
        return largest.cost(row.prompt_tokens, row.completion_tokens)

    return largest_cost


def _quality_lines(
    judged: list[tuple[str, str, float | None]], rated: list[tuple[str, str, float]]
) -> list[str]:
    """Estimated quality per tier from shadow verdicts, and feedback counts per tier."""
    from tierroute.stats import wilson

    lines = []
    verdicts: dict[str, list[float]] = {}
    for _, tier, verdict in judged:
        if verdict is not None:
            verdicts.setdefault(tier, []).append(verdict)
    if verdicts:
        lines.append("\nestimated quality (shadow judgements: share good enough, 95% CI)")
        for tier, values in sorted(verdicts.items()):
            lo, hi = wilson(sum(values), len(values))
            lines.append(
                f"  {tier:<14} {sum(values) / len(values):.2f}  ({lo:.2f}-{hi:.2f}, "
                f"{len(values)} judged)"
            )
    from tierroute.ledger import feedback_by_tier

    summary = feedback_by_tier(rated)
    if summary:
        lines.append("\nfeedback")
        for tier, f in sorted(summary.items()):
            lines.append(
                f"  {tier:<14} {f['n']} ratings: {f['up']} up, {f['down']} down, "
                f"mean {f['mean']:.2f}"
            )
    return lines


def cmd_report(args: argparse.Namespace) -> int:
    from tierroute.cli_ledger import key_legend, key_names, open_ledger, target_of
    from tierroute.ledger import (
        build_report,
        format_report,
        parse_since,
        report_csv,
        report_json,
    )

    since = parse_since(args.since) if args.since else None
    largest_cost = _pricing(args.config)
    with open_ledger(target_of(args)) as ledger:
        rows = ledger.rows(since=since)
        judged = ledger.judgements(since)
        rated = ledger.feedback_since(since)
        judging = ledger.judging_spend(since)
        names = key_names(ledger) if args.by == "key" else {}
    by_request: dict[str, list[float]] = {}
    for request_id, _, rating in rated:
        by_request.setdefault(request_id, []).append(rating)
    verdicts: dict[str, list[float]] = {}
    for request_id, _, verdict in judged:
        if verdict is not None:
            verdicts.setdefault(request_id, []).append(verdict)
    report = build_report(
        rows,
        largest_cost,
        by=args.by,
        ratings={k: sum(v) / len(v) for k, v in by_request.items()},
        verdicts=verdicts,
        judging=judging,
    )
    if args.format == "csv":
        sys.stdout.write(report_csv(report))
    elif args.format == "json":
        print(report_json(report))
    else:
        print(format_report(report))
        for line in key_legend(names, [t.tier for t in report.tiers]):
            print(line)
        for line in _quality_lines(judged, rated):
            print(line)
    if args.plot:
        from tierroute.ledger import plot_report

        plot_report(rows, Path(args.plot), largest_cost)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _probe_remote(base_url: str, key: str | None, timeout: float = 5.0) -> str | None:
    """None when `base_url`/models answers; else what went wrong, in a few words."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(base_url.rstrip("/") + "/models")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return None if answer.status < 400 else f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} from {base_url}/models"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"cannot reach {base_url}: {reason}"


def cmd_config_check(args: argparse.Namespace) -> int:
    """Everything `serve` would load, loaded: the file, each tier's model or endpoint, the
    router; every problem is listed in one line."""
    import os

    from tierroute.artifact import calibrated_threshold
    from tierroute.errors import TierrouteError
    from tierroute.gateway.settings import apply_calibration, load_settings

    settings = load_settings(args.file)
    problems = []
    for spec in (m for tier in settings.tiers for m in tier.targets):
        t = replace(spec.tier, name=spec.key)  # a model of a tier of several: tier/model
        where = spec.base_url if spec.kind == "openai" else "in-process llama.cpp"
        print(
            f"tier {t.name:<10} {spec.kind:<6} {t.model}  ({where}; "
            f"${t.input_price_per_m:g}/${t.output_price_per_m:g} per M tokens, "
            f"timeout {spec.timeout_s:g}s)"
        )
        key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        if spec.api_key_env and not key:
            problems.append(f"${spec.api_key_env} (API key of tier {t.name}) is not set")
        if spec.kind == "local":
            from tierroute.backends.models import MODELS, resolve_model

            if t.model not in MODELS:
                problems.append(
                    f"tier {t.name}: unknown local model '{t.model}'; "
                    f"known: {', '.join(sorted(MODELS))}"
                )
            elif not args.offline:
                try:
                    print(f"  model file {resolve_model(t.model)}: checked")
                except TierrouteError as exc:
                    problems.append(f"tier {t.name}: {exc}")
        elif spec.base_url and not args.offline:
            failure = _probe_remote(spec.base_url, key)
            if failure:
                problems.append(f"tier {t.name}: {failure}")
            else:
                print(f"  {spec.base_url}/models: answers")
    print(
        f"policy: thresholds {settings.policy.thresholds}, "
        f"abstain band {settings.policy.abstain_band}; router {settings.router}"
    )
    try:
        router, _ = _resolve_router(settings.router, batch=False)
        print(f"router {settings.router}: loaded ({type(router).__name__})")
        if any(t.models for t in settings.tiers):
            from tierroute.gateway.choose import ModelChooser

            ModelChooser(settings, router, settings.choose)  # router_model columns exist?
    except TierrouteError as exc:
        problems.append(f"router {settings.router}: {exc}")
    threshold = calibrated_threshold(settings.router)
    if threshold is not None:
        print(apply_calibration(settings, threshold))
    if not args.offline:
        from tierroute.cli_ledger import check_ledger

        problems += check_ledger(settings.ledger)
    if problems:
        raise InputError("; ".join(problems))
    print(f"{settings.source}: OK")
    return 0


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error."""

    def error(self, message: str) -> Any:
        print(f"{PROG}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from tierroute import __version__
    from tierroute.ledger.report import GROUPINGS

    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="measure a router on outcome data")
    _add_data_args(p, required=False)
    p.add_argument(
        "--models",
        choices=("pair", "all"),
        default="pair",
        help="all: route among every model of each file, against each single model, the "
        "best pair and their convex hull (no --small/--large)",
    )
    p.add_argument(
        "--router",
        default="default",
        help="random, rules, knn, logreg, mf, irt, bert, default, default-static (the same "
        "recipe on a static embedding: microseconds a prompt), or a saved router folder",
    )
    p.add_argument(
        "--cv-group",
        metavar="FIELD",
        help="grouped k-fold CV: no value of FIELD in both train and test",
    )
    p.add_argument("--folds", type=_whole(2), default=5)
    p.add_argument("--seed", type=int, default=0)
    _add_target_args(p)
    p.add_argument("--json", metavar="FILE", type=_output_file, help="write every figure as JSON")
    p.add_argument("--plot", metavar="FILE", type=_output_file, help="write a PNG of the curves")
    p.add_argument(
        "--x",
        choices=("share", "cost"),
        default="share",
        help="plot against the large-call share or dollars (needs cost_usd)",
    )
    p.add_argument(
        "--scores-out",
        metavar="FILE",
        type=_output_file,
        help="write {id, score} per row (out-of-fold under CV)",
    )
    p.add_argument(
        "--exclude-trained",
        action="store_true",
        help="drop rows a saved router was trained on instead of refusing",
    )
    p.add_argument("--queries-per-day", type=_whole(0), default=100_000)
    p.add_argument("--price-small", type=_amount, help="USD per query on the small tier")
    p.add_argument("--price-large", type=_amount, help="USD per query on the large tier")
    p.add_argument(
        "--tiers",
        metavar="FILE",
        help="tier config whose first and last tiers' token prices set the savings",
    )
    p.add_argument(
        "--output-tokens",
        type=_whole(1),
        default=256,
        help="completion tokens per query assumed with --tiers prices",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train a router and save it as a versioned folder")
    _add_data_args(p, required=False)
    p.add_argument("--router", required=True, choices=("knn", "logreg", "mf", "irt", "bert"))
    p.add_argument(
        "--rule-prior",
        type=_amount,
        metavar="WEIGHT",
        help="score with the built-in rules, times WEIGHT, on top of the learned router "
        "(see routers/prior.py)",
    )
    p.add_argument("--out", required=True, help="folder to write the router into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--from-ledger",
        action="store_true",
        help="learn from the gateway's feedback and shadow judgements instead; "
        "promote only if better than the current router on held-out requests",
    )
    p.add_argument("--data-dir", metavar="DIR", help="with --from-ledger: the ledger's folder")
    p.add_argument("--ledger", metavar="URL", help="with --from-ledger: the ledger's database")
    p.add_argument("--config", metavar="FILE", help="with --from-ledger: the gateway config")
    p.add_argument(
        "--current", help="with --from-ledger: the router to beat (default: the config's)"
    )
    p.add_argument("--since", help="with --from-ledger: only requests since, e.g. 7d")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "replay",
        help="replay an outcome file as traffic through the engine and print the "
        "continuous learner's learning curve",
    )
    _add_data_args(p)
    p.add_argument("--router", help="the cold router (default: the config's)")
    p.add_argument("--config", metavar="FILE", help="gateway YAML (tiers, policy, learning)")
    p.add_argument("--json", metavar="FILE", help="write the curve as JSON")
    p.add_argument("--limit", type=int, help="use this many rows (after the seeded shuffle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-size",
        type=int,
        help="rows held back as the never-sent evaluation set (default min(500, a third))",
    )
    p.add_argument(
        "--folds",
        type=_whole(1, 100),
        default=1,
        help="cross-fitting: replay once per fold with that fold as the evaluation set, and "
        "average the curves (every row evaluated once; instead of --eval-size)",
    )
    p.add_argument(
        "--reveal", type=float, default=1.0, help="share of requests whose outcome is revealed"
    )
    p.add_argument(
        "--skip",
        action="append",
        metavar="FIELD=PREFIX",
        help="leave out rows whose field starts with PREFIX, e.g. meta.src=ori_mmlu",
    )
    p.add_argument("--data-dir", metavar="DIR", help="keep the replay's ledger here")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "rollback",
        help="undo the continuous learner's last promotion of a stopped gateway "
        "(a running one: POST /v1/router/rollback)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="the gateway's data folder")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("calibrate", help="fit a saved router's threshold to a target")
    _add_data_args(p)
    p.add_argument("--router", required=True, help="a saved router folder")
    _add_target_args(p)
    p.add_argument(
        "--exclude-trained",
        action="store_true",
        help="drop rows the router was trained on instead of refusing",
    )
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("route", help="route one request and say why")
    p.add_argument("prompt", nargs="?", help="the prompt to route")
    p.add_argument(
        "--messages",
        metavar="FILE",
        help="a JSON list of chat messages (a whole conversation) instead",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="gateway YAML whose tiers, policy and router to use "
        "(default: the built-in one `serve` runs)",
    )
    p.add_argument(
        "--router",
        help="random, rules, default, default-static, or a saved router folder (default: "
        "the config's router)",
    )
    p.add_argument("--tiers", metavar="FILE", help="a tiers file instead of a gateway config")
    p.add_argument("--priority", choices=("batch", "interactive", "critical"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("serve", help="run the OpenAI-compatible gateway")
    p.add_argument("--config", metavar="FILE", help="gateway YAML (default: local tiers)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_whole(0, 65535), default=8000)
    p.add_argument("--data-dir", metavar="DIR", help="where the ledger lives")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one object per line with request_id, tier and event fields",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="savings and latency from the ledger")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--ledger", metavar="URL", help="postgresql://... or sqlite:PATH")
    p.add_argument("--since", help="e.g. 1h, 30m, 2d or an ISO date")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="gateway YAML whose largest tier prices rows written before the ledger "
        "recorded prices (newer rows carry their own)",
    )
    p.add_argument("--by", choices=GROUPINGS, default="tier", help="group rows by this")
    p.add_argument("--format", choices=("text", "csv", "json"), default="text")
    p.add_argument("--plot", metavar="FILE", type=_output_file, help="write a PNG")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="gateway configuration")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    c = config_sub.add_parser("check", help="validate a gateway YAML")
    c.add_argument("file")
    c.add_argument(
        "--offline",
        action="store_true",
        help="check the file only: do not load local models or call remote tiers",
    )
    c.set_defaults(func=cmd_config_check)

    from tierroute.cli_ledger import add_commands

    add_commands(sub)
    _add_quiet(sub)
    return parser


def _add_quiet(sub: Any) -> None:
    """--quiet on every command: no progress bars (they are off anyway off a terminal)."""
    for command in sub.choices.values():
        command.add_argument("--quiet", action="store_true", help="no progress bars on stderr")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from tierroute.progress import set_quiet

    set_quiet(args.quiet)
    try:
        code: int = args.func(args)
        return code
    except TierrouteError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder named on the command line, or the disk
        where = f"'{exc.filename}': " if exc.filename else ""
        print(
            f"{PROG}: error: {where}{exc.strerror or exc}; check the path, that its folder "
            "exists and that it can be read or written",
            file=sys.stderr,
        )
        return 2
    except UnicodeDecodeError as exc:
        print(
            f"{PROG}: error: a file given is not UTF-8 text ({exc.reason} at byte "
            f"{exc.start}); pass the text file the option expects",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
