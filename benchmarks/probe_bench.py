"""Does the small local model's own view of a prompt predict who needs the large tier?

    nice -n 10 python benchmarks/probe_bench.py features [--rows 1500] [--budget 2400]
    python benchmarks/probe_bench.py eval [--out bench-out] [--shipped-for-rb]
    python benchmarks/probe_bench.py cost [--prompts 10] [--max-tokens 128]

Cost: about 0.3 CPU-seconds per 32-token prompt on a quiet core (SmolLM2 Q4_1, 1 thread;
several CPU-seconds when the machine is oversubscribed), so a full sample (5,802 prompts) is
roughly half an hour of one quiet core; `--budget` bounds a run and several workers can
share the queue.

First run (2026-11-29, machine oversubscribed at load 20-35 on 2 cores, six niced workers for
50 minutes): only 109 prompts got features (~21 per file), so the LOO table is noise: mean
APGR probe 0.441, stacked 0.429, default recipe 0.459 on those rows; stacked - default
-0.028, 95% bootstrap -0.165 .. +0.081. No evidence it helps, none that it cannot. Cost, side
by side in one run (`cost --prompts 2 --max-tokens 128`, same load): default router CPU p50
19 ms per prompt, probe 6.6 s (~340x); even on a quiet core a 32-token probe is ~0.3 s of
CPU, 60x route_bench's 5 ms chat p50 target, so as a router input it would only fit fused
with the small tier's own prefill (which reuses the KV cache when the request stays small).

Issue 9's hypothesis: prompts SmolLM2-135M-Instruct finds surprising, or is unsure how to
answer, are the ones small models fail, and since that is a relation between a prompt and a
small LM rather than a file's format, it may transfer across datasets where the MiniLM
embedding does not (benchmarks/label_ceiling.py).

`features`: one forward pass of SmolLM2-135M (llama-cpp-python, the `local` extra) over each
chat-templated prompt, no generation. From the logits of every position: the log-prob of each
prompt token (mean, sd, quantiles, min), the mean entropy of the next-token distribution
inside the prompt, the mean surprise beyond that entropy, and after the assistant header the
entropy, top-1 probability and top-1/top-2 margin of the first answer token; plus the token
count. The prompt is cut to its first `--max-tokens` tokens (the template's tail is kept).
Rows come from each LOO file in a seeded order, interleaved round-robin, so a run cut short
by `--budget` seconds still covers every file evenly; features are cached in
`cache_dir()/probe/features.sqlite` by sha256 of (model, cap, prompt), so runs resume;
several workers started at once share the queue (each prompt is claimed by one).

`eval`: leave-one-dataset-out on the cached rows (quality_bench's LOO_FILES and pairs; the
MMLU-Pro sample excludes its ori_mmlu* rows, which are MMLU questions), APGR per held-out file:
  probe        logistic regression of "large beat small" on the probe features, trained on
               the other licence-ok files' pairs (AlpacaEval is only ever a test);
  default      the shipped default's recipe (quality_bench's old-default, rule prior 0.5),
               retrained without the held-out file, on the same rows: the baseline;
  stacked      the same logistic model on [logit(default score), probe features];
  default+rank the default's logit plus w x the probe model's, w chosen on the training files;
with random and oracle on the same rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODEL = "smollm2-135m"
NAMES = (
    "log_tokens",
    "truncated",
    "lp_mean",
    "lp_sd",
    "lp_q10",
    "lp_q25",
    "lp_q50",
    "lp_q90",
    "lp_min",
    "ent_mean",
    "surprise_mean",
    "next_entropy",
    "next_top1",
    "next_margin",
)


class Probe:
    """SmolLM2's per-prompt statistics from one forward pass (no sampling)."""

    def __init__(self, max_tokens: int = 128, n_threads: int = 1) -> None:
        self.max_tokens = max_tokens
        self.n_threads = n_threads
        self._llm: Any = None

    def _load(self) -> Any:
        if self._llm is None:
            import llama_cpp

            from tierroute.backends.models import resolve_model

            self._llm = llama_cpp.Llama(
                model_path=str(resolve_model(MODEL)),
                n_ctx=self.max_tokens + 64,
                n_batch=self.max_tokens + 64,
                logits_all=True,
                n_threads=self.n_threads,
                verbose=False,
            )
            llm = self._llm
            template = llm.metadata["tokenizer.chat_template"]
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            mark = "\x00PROMPT\x00"
            text = Jinja2ChatFormatter(template, eos_token="", bos_token="")(
                messages=[{"role": "user", "content": mark}]
            ).prompt
            head, tail = text.split(mark)
            self._head = llm.tokenize(head.encode(), add_bos=False, special=True)
            self._tail = llm.tokenize(tail.encode(), add_bos=False, special=True)
            llm.reset()
            llm.eval(self._head)  # the shared prefix: kept in the KV cache for every prompt
        return self._llm

    def features(self, prompt: str) -> np.ndarray:
        llm = self._load()
        body = llm.tokenize(prompt.encode("utf-8", "replace"), add_bos=False, special=False)
        n_body = len(body)
        body = body[: self.max_tokens] or llm.tokenize(b" ", add_bos=False)
        head = len(self._head)
        llm.n_tokens = head  # eval() drops the KV cache beyond n_tokens, then appends
        llm.eval(body + self._tail)
        # logits at positions head-1 .. end: row i predicts token i+1 of the sequence
        logits = np.asarray(llm.scores[head - 1 : head + len(body) + len(self._tail)], np.float64)
        top = logits.max(1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(1))
        logp = logits - logz[:, None]
        probs = np.exp(logp)
        entropy = -(probs * logp).sum(1)
        lp = logp[np.arange(len(body)), body]  # each prompt token given what precedes it
        ent = entropy[: len(body)]
        last = probs[-1]
        two = np.partition(last, -2)[-2:]
        return np.array(
            [
                np.log1p(n_body),
                float(n_body > self.max_tokens),
                lp.mean(),
                lp.std(),
                *np.quantile(lp, [0.1, 0.25, 0.5, 0.9]),
                lp.min(),
                ent.mean(),
                (-lp - ent).mean(),
                entropy[-1],
                two[1],
                two[1] - two[0],
            ]
        )


class FeatureCache:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, timeout=30)
        self.conn.execute("CREATE TABLE IF NOT EXISTS probe (key TEXT PRIMARY KEY, vec TEXT)")
        self.conn.execute("CREATE TABLE IF NOT EXISTS claim (key TEXT PRIMARY KEY)")
        self.conn.commit()

    def claim(self, key: str) -> bool:
        """True for the one worker that gets to compute `key` (the rest skip it)."""
        cursor = self.conn.execute("INSERT OR IGNORE INTO claim VALUES (?)", (key,))
        self.conn.commit()
        return cursor.rowcount == 1

    @staticmethod
    def key(prompt: str, max_tokens: int) -> str:
        return hashlib.sha256(f"{MODEL}\x00{max_tokens}\x00{prompt}".encode()).hexdigest()

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i in range(0, len(keys), 500):
            part = list(keys[i : i + 500])
            marks = ",".join("?" * len(part))
            for k, v in self.conn.execute(
                f"SELECT key, vec FROM probe WHERE key IN ({marks})", part
            ):
                out[k] = np.array(json.loads(v))
        return out

    def put(self, key: str, vec: np.ndarray) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO probe VALUES (?, ?)", (key, json.dumps(vec.tolist()))
        )
        self.conn.commit()


def cache_path() -> Path:
    from tierroute.paths import cache_dir

    return cache_dir() / "probe" / "features.sqlite"


def sample(rows: int, seed: int = 0) -> dict[str, Any]:
    """{LOO file name: its outcomes, in a seeded order, at most `rows` of them}."""
    import quality_bench as qb

    out = {}
    for f in qb.LOO_FILES:
        if not (qb.DATA / f.file).is_file():
            continue
        o = qb.loo_outcomes(f, drop_ori_mmlu=f.file == qb.PRO)
        order = np.random.default_rng(seed).permutation(len(o))[:rows]
        out[f.name] = (f, o.subset(order))
    return out


def run_features(args: argparse.Namespace) -> None:
    parts = sample(args.rows)
    cache = FeatureCache(cache_path())
    queue: list[str] = []
    longest = max(len(o) for _, o in parts.values())
    for i in range(longest):  # round-robin, so a cut-short run covers every file
        queue.extend(o.prompts[i] for _, o in parts.values() if i < len(o))
    queue = list(dict.fromkeys(queue))
    keys = [FeatureCache.key(p, args.max_tokens) for p in queue]
    done = cache.get(keys)
    todo = [(k, p) for k, p in zip(keys, queue, strict=True) if k not in done]
    print(f"{len(queue):,} prompts, {len(done):,} cached, {len(todo):,} to compute", flush=True)
    probe = Probe(args.max_tokens, args.threads)
    start = time.perf_counter()
    count = 0
    for key, prompt in todo:
        if time.perf_counter() - start > args.budget:
            print(f"budget of {args.budget:g}s reached", flush=True)
            break
        if not cache.claim(key):  # another worker has it: run several workers at once
            continue
        cache.put(key, probe.features(prompt))
        count += 1
        if count % 100 == 0:
            rate = count / (time.perf_counter() - start)
            print(f"{count:,} computed, {rate:.2f} prompts/s", flush=True)
    spent = time.perf_counter() - start
    print(f"{count:,} prompts in {spent:.0f}s: {count / max(spent, 1e-9):.2f} prompts/s")


def run_cost(args: argparse.Namespace) -> None:
    """Per-request cost of the probe beside the shipped default router's, interleaved in one
    run (so the machine's load hits both alike): wall and CPU seconds per single prompt."""
    import resource

    from tierroute.artifact import open_router
    from tierroute.embed import Embedder
    from tierroute.encoder import TextEncoder

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    parts = sample(args.prompts)
    prompts = [p for _, o in parts.values() for p in o.prompts[: args.prompts]]
    router, _ = open_router("default", lambda: TextEncoder(Embedder()))  # no disk cache
    probe = Probe(args.max_tokens, args.threads)
    router.score_texts(["warm up"])
    probe.features("warm up")
    times: dict[str, list[tuple[float, float]]] = {"default router": [], "probe": []}
    for prompt in prompts:
        for name, fn in (("default router", router.score), ("probe", probe.features)):
            wall, used = time.perf_counter(), cpu()
            fn(prompt)
            times[name].append((time.perf_counter() - wall, cpu() - used))
    for name, rows in times.items():
        wall_ms = np.array([w for w, _ in rows]) * 1000
        cpu_ms = np.array([c for _, c in rows]) * 1000
        print(
            f"{name}: {len(rows)} prompts, wall p50 {np.median(wall_ms):.1f} ms "
            f"(p90 {np.quantile(wall_ms, 0.9):.1f}), cpu p50 {np.median(cpu_ms):.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    feats = sub.add_parser("features", help="compute and cache the probe features")
    feats.add_argument("--rows", type=int, default=1500, help="rows per file at most")
    feats.add_argument("--budget", type=float, default=2400.0, help="seconds at most")
    feats.add_argument("--max-tokens", type=int, default=32)
    feats.add_argument("--threads", type=int, default=1)
    ev = sub.add_parser("eval", help="leave-one-dataset-out on the cached rows")
    ev.add_argument("--rows", type=int, default=1500)
    ev.add_argument("--max-tokens", type=int, default=32)
    ev.add_argument("--out", default="bench-out")
    ev.add_argument("--min-rows", type=int, default=50, help="skip files with fewer rows")
    ev.add_argument("--no-default", action="store_true", help="skip the default's recipe")
    ev.add_argument(
        "--shipped-for-rb",
        action="store_true",
        help="RouterBench held out: the shipped router (trained on it: in-sample) instead of "
        "the recipe refitted on MMLU alone (which needs all 14k MMLU embeddings)",
    )
    cost = sub.add_parser("cost", help="per-request cost beside the default router")
    cost.add_argument("--prompts", type=int, default=10, help="per file")
    cost.add_argument("--max-tokens", type=int, default=128)
    cost.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.command == "features":
        run_features(args)
    elif args.command == "cost":
        run_cost(args)
    else:
        run_eval(args)


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, scale = train.mean(0), train.std(0) + 1e-9
    return [(x - mean) / scale for x in (train, *others)]


def fit_logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray, c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000).fit(x, y, sample_weight=weight)


def file_weights(groups: list[int]) -> np.ndarray:
    """Every training file weighs the same in total, whatever its row count."""
    g = np.asarray(groups)
    counts = np.bincount(g)
    w = 1.0 / counts[g]
    out: np.ndarray = w / w.mean()
    return out


def rank01(s: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    out: np.ndarray = (rankdata(s) - 0.5) / len(s)
    return out


def run_eval(args: argparse.Namespace) -> None:
    import quality_bench as qb

    from tierroute.artifact import open_router
    from tierroute.embed import Embedder, EmbeddingCache
    from tierroute.encoder import TextEncoder
    from tierroute.eval.metrics import apgr, routing_curve
    from tierroute.routers.base import logit

    parts = sample(args.rows)
    cache = FeatureCache(cache_path())
    data: dict[str, tuple[Any, Any, np.ndarray]] = {}
    for name, (f, o) in parts.items():
        keys = [FeatureCache.key(p, args.max_tokens) for p in o.prompts]
        found = cache.get(keys)
        keep = [i for i, k in enumerate(keys) if k in found]
        sub = o.subset(keep)
        x = np.array([found[keys[i]] for i in keep]).reshape(len(keep), len(NAMES))
        data[name] = (f, sub, x)
        print(f"{name}: {len(keep):,} of {len(o):,} sampled rows have probe features")
    encoder = TextEncoder(Embedder(), EmbeddingCache())

    def score(s: np.ndarray, o: Any) -> float:
        return apgr(routing_curve(s, o.small, o.large))

    held = [n for n in data if len(data[n][1]) >= args.min_rows]
    table: dict[str, dict[str, float]] = {}
    single: dict[str, dict[str, float]] = {}
    paired: dict[str, tuple[Any, np.ndarray, np.ndarray, np.ndarray]] = {}
    rng = np.random.default_rng(0)
    for name in held:
        f, test, x_test = data[name]
        cols = table.setdefault
        train_names = [n for n in held if n != name and data[n][0].trains]
        # the baseline: the shipped recipe retrained without the held-out file (full files)
        if args.no_default:  # a quick look at the probe alone: a constant stands in
            default: Any = _Constant()
        elif f.file == qb.MMLU or (f.file == qb.RB and not args.shipped_for_rb):
            _, full_train = qb.loo_parts(f, list(qb.LOO_FILES))
            default = qb.with_rule_prior(qb._old_default(full_train, encoder), encoder, 0.5)
        else:  # the recipe trains on MMLU + RouterBench only: its fit is the shipped router
            default, _ = open_router("default", lambda: encoder)
        d_test = default.score_texts(test.prompts)
        xs, ys, gs, ds, hs = [], [], [], [], []
        for g, n in enumerate(train_names):
            _, o, x = data[n]
            xs.append(x)
            ys.append(o.labels)
            hs.append(rank01(difficulty(o)))
            gs.extend([g] * len(o))
            ds.append(default.score_texts(o.prompts))
        x_train, y_train, d_train = np.vstack(xs), np.concatenate(ys), np.concatenate(ds)
        w = file_weights(gs)
        z_train, z_test = standardise(x_train, x_test)
        probe = fit_logistic(z_train, y_train, w, 0.1)
        p_test = probe.decision_function(z_test)
        from sklearn.linear_model import Ridge

        hard = Ridge(alpha=10.0).fit(z_train, np.concatenate(hs), sample_weight=w)
        h_test = hard.predict(z_test)
        stack_train = np.column_stack([logit(d_train), z_train])
        stack_test = np.column_stack([logit(d_test), z_test])
        s_train, s_test = standardise(stack_train, stack_test)
        stacked = fit_logistic(s_train, y_train, w, 0.1)
        row = {
            "random": float(np.mean([score(rng.random(len(test)), test) for _ in range(20)])),
            "oracle": score(test.large - test.small, test),
            "default (old-default recipe, rule prior 0.5)": score(d_test, test),
            "probe (logistic on probe features)": score(p_test, test),
            "probe-difficulty (ridge on within-file difficulty rank)": score(h_test, test),
            "stacked (logistic on default logit + probe)": score(
                stacked.decision_function(s_test), test
            ),
            "rank average of default and probe": score(rank01(d_test) + rank01(p_test), test),
        }
        for k, v in row.items():
            cols(k, {})[name] = v
        paired[name] = (test, d_test, p_test, stacked.decision_function(s_test))
        # each feature alone, signed by its correlation with the label on the training files
        for j, feat in enumerate(NAMES):
            sign = np.sign(np.corrcoef(x_train[:, j], y_train)[0, 1]) or 1.0
            single.setdefault(feat, {})[name] = score(sign * x_test[:, j], test)
        print(
            f"held out {name} ({len(test):,} rows): "
            + ", ".join(f"{k.split(' (')[0]} {v:.3f}" for k, v in row.items()),
            flush=True,
        )
        coef = dict(zip(NAMES, np.round(probe.coef_[0], 2), strict=True))
        print(f"  probe coefficients (standardised): {coef}", flush=True)
    text = _table(table, held) + "\n\n" + _bootstrap(paired, score)
    text += "\n\nEach probe feature alone (sign from the training files):\n\n"
    text += _table(single, held)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_loo.md").write_text(text + "\n")
    print("\n" + text + f"\n\nwrote {out / 'probe_loo.md'}")


def difficulty(o: Any) -> np.ndarray:
    """1 - the mean score of every model of the file on each row (verdicts mapped to
    [0, 1]): a training target that uses all of a file's models, not only its pair."""
    scores = o.model_scores().scores
    if np.nanmin(scores) < 0:  # pairwise verdicts in [-1, 1]
        scores = (scores + 1.0) / 2.0
    counts = np.sum(~np.isnan(scores), axis=1)
    mean = np.nansum(scores, axis=1) / np.maximum(counts, 1)
    out: np.ndarray = np.where(counts > 0, 1.0 - mean, 0.5)
    return out


class _Constant:
    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.full(len(texts), 0.5)


def _bootstrap(paired: dict[str, Any], score: Any, draws: int = 300) -> str:
    """95% intervals of (probe - default) and (stacked - default), rows resampled within
    each held-out file, on the mean over files: are the differences above the noise?"""
    from tierroute.errors import DataError

    rng = np.random.default_rng(1)
    diffs: dict[str, list[float]] = {"probe - default": [], "stacked - default": []}
    for _ in range(draws):
        per_file = []
        for test, d, p, st in paired.values():
            i = rng.integers(0, len(test), len(test))
            o = test.subset(i)
            try:
                base = score(d[i], o)
                per_file.append((score(p[i], o) - base, score(st[i], o) - base))
            except DataError:  # a resample where the pair ties: PGR undefined
                break
        if len(per_file) < len(paired):
            continue
        if per_file:
            mean = np.mean(per_file, axis=0)
            diffs["probe - default"].append(float(mean[0]))
            diffs["stacked - default"].append(float(mean[1]))
    lines = []
    for k, v in diffs.items():
        if v:
            lo, mid, hi = np.quantile(v, [0.025, 0.5, 0.975])
            lines.append(
                f"- mean over files, {k}: {mid:+.3f} (95% bootstrap {lo:+.3f} .. {hi:+.3f})"
            )
    return "\n".join(lines)


def _table(cells: dict[str, dict[str, float]], names: list[str]) -> str:
    lines = ["| | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (len(names) + 1)]
    for k, row in cells.items():
        values = [row[n] for n in names]
        lines.append(
            f"| {k} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
