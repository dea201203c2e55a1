"""Run README's command examples and rewrite their output from what the commands print.

    python3 scripts/readme_examples.py            # run them, rewrite README.md's outputs
    python3 scripts/readme_examples.py --check    # run them, fail if one fails; no rewrite
    python3 scripts/readme_examples.py --only route train-calibrate --skip-slow

An example is an indented block fenced by HTML comments, so README renders unchanged:

    <!-- example: ID -->                     run by this script and by tests/test_readme.py
    <!-- example: ID slow="why" -->          run by this script; the test skips it, saying why
    <!-- example: ID manual="why" -->        run by neither (a live gateway, say): kept as is
        $ tierroute ... \\
            continued ...
        output lines (replaced by the real output)
    <!-- /example -->

Commands run with bash in README's order, in one scratch folder beside a link to
../shared (so `../shared/data/...` works and files they write stay out of the repo),
with `tierroute` running this checkout's code.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPEN = re.compile(r'^<!-- example: ([\w-]+)(?: (slow|manual)="([^"]+)")? -->$')
CLOSE = "<!-- /example -->"
INDENT = "    "


@dataclass
class Command:
    text: str  # as written in README, continuation lines included (without the indent)
    output: list[str] = field(default_factory=list)


@dataclass
class Example:
    id: str
    kind: str  # "" (cheap), "slow" or "manual"
    why: str
    start: int  # README line index of the opening comment
    end: int  # of the closing comment
    commands: list[Command]


@dataclass
class Ran:
    example: str
    command: str
    code: int
    output: str
    seconds: float


def parse(text: str) -> list[Example]:
    lines = text.split("\n")
    examples: list[Example] = []
    i = 0
    while i < len(lines):
        m = OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        end = lines.index(CLOSE, i + 1)
        commands: list[Command] = []
        continued = False
        for line in lines[i + 1 : end]:
            body = line[len(INDENT) :] if line.startswith(INDENT) else line.strip()
            if body.startswith("$ ") and not continued:
                commands.append(Command(body[2:]))
                continued = body.endswith("\\")
            elif continued:
                commands[-1].text += "\n" + body
                continued = body.endswith("\\")
            elif commands and (body or commands[-1].output):
                commands[-1].output.append(body)
        if not commands:
            raise SystemExit(f"README line {i + 1}: example {m.group(1)} has no '$ ' command")
        for c in commands:
            while c.output and not c.output[-1]:
                c.output.pop()
        examples.append(Example(m.group(1), m.group(2) or "", m.group(3) or "", i, end, commands))
        i = end + 1
    ids = [e.id for e in examples]
    if len(ids) != len(set(ids)):
        raise SystemExit(f"README has duplicate example ids: {ids}")
    return examples


class Runner:
    """Runs commands in a scratch folder with `tierroute` bound to this checkout."""

    def __init__(self, scratch: Path, timeout_s: float = 1800) -> None:
        self.work = scratch / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        shared = ROOT.parent / "shared"
        if shared.exists() and not (scratch / "shared").exists():
            (scratch / "shared").symlink_to(shared)
        bin_dir = scratch / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "tierroute"
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m tierroute.cli "$@"\n')
        shim.chmod(0o755)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p
            ),
            "TIERROUTE_DATA_DIR": str(scratch / "data"),
            "COLUMNS": "200",
        }
        self.timeout_s = timeout_s

    def run(self, example: Example) -> list[Ran]:
        out = []
        for command in example.commands:
            start = time.perf_counter()
            try:
                proc = subprocess.run(
                    ["bash", "-c", command.text],
                    cwd=self.work,
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=self.timeout_s,
                )
                code, text = proc.returncode, proc.stdout
                if code != 0:
                    text += proc.stderr
            except subprocess.TimeoutExpired:
                code, text = -1, f"timed out after {self.timeout_s:.0f}s"
            out.append(Ran(example.id, command.text, code, text, time.perf_counter() - start))
        return out


def render(example: Example, runs: list[Ran]) -> list[str]:
    """The example's lines with each command's output replaced by the real one."""
    lines = []
    for command, ran in zip(example.commands, runs, strict=True):
        first, *rest = command.text.split("\n")
        lines.append(INDENT + "$ " + first)
        lines += [INDENT + r for r in rest]
        output = ran.output.rstrip("\n").split("\n") if ran.output.strip() else []
        lines += [(INDENT + o).rstrip() for o in output]
        lines.append("")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def rewrite(text: str, results: dict[str, list[Ran]]) -> str:
    lines = text.split("\n")
    for example in reversed(parse(text)):  # from the end: earlier line numbers stay valid
        if example.id in results:
            lines[example.start + 1 : example.end] = render(example, results[example.id])
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="run only; do not rewrite")
    parser.add_argument("--only", nargs="+", metavar="ID", help="these examples only")
    parser.add_argument("--skip-slow", action="store_true", help="leave slow examples as is")
    args = parser.parse_args()
    text = README.read_text()
    examples = parse(text)
    known = {e.id for e in examples}
    unknown = set(args.only or []) - known
    if unknown:
        raise SystemExit(f"no README example named {sorted(unknown)}; there are {sorted(known)}")
    results: dict[str, list[Ran]] = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="readme-examples-") as tmp:
        runner = Runner(Path(tmp))
        for example in examples:
            if example.kind == "manual" or (args.only and example.id not in args.only):
                print(f"skip {example.id}" + (f": {example.why}" if example.why else ""))
                continue
            if example.kind == "slow" and args.skip_slow:
                print(f"skip {example.id}: {example.why}")
                continue
            runs = runner.run(example)
            for ran in runs:
                status = "ok" if ran.code == 0 else f"FAILED (exit {ran.code})"
                print(f"{example.id}: {status} in {ran.seconds:.1f}s: $ {ran.command}")
                if ran.code != 0:
                    print(ran.output, file=sys.stderr)
                    failed.append(example.id)
            if all(r.code == 0 for r in runs):
                results[example.id] = runs
    if not args.check and results:
        README.write_text(rewrite(text, results))
        print(f"rewrote {len(results)} example(s) in {README}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
