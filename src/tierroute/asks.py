"""What a request asks for, read from its instruction and not from the text it pastes.

A request is an instruction plus, often, material to work on: an email to reformat, code
to debug, a passage to answer from. How hard the request is depends mostly on what the
instruction asks (capitalise the days vs prove the step is wrong), while embeddings and
length read mostly the material. So:

- `split_request` cuts a text into (instruction, material) from structure alone: fenced
  code, a block after a line that ends in a colon, the rest of a line after a colon or a
  long quotation, each only when the instruction points at it ("this email", "the
  following", "these names", "here is"), so a requirement list after "Cover:" stays part of
  the instruction;
- `ask_kind` names what the instruction asks for: a derivation or proof, a design,
  an analysis, code to build, a problem of several steps (four or more quantities, or
  solving / computing an object), a clerical edit of the material, a lookup or one-step
  sum, or small talk.

Both are plain regular expressions over the text: the same in any benchmark, chat or API
format, and cheap enough for every request. `rules.yaml` reads the kind through a rule's
`ask:` condition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ASK_KINDS = (
    "proof",
    "design",
    "analysis",
    "build",
    "problem",
    "edit",
    "lookup",
    "smalltalk",
    "other",
)

# The instruction points at material it carries: "this email", "the following", "these
# names", "here is", "below".
_DEICTIC = re.compile(
    r"\b(this|these|the following|following|below|here(?:'s| is| are)|above)\b", re.I
)
_FENCE = re.compile(r"```.*?(?:```|\Z)", re.S)
# Material set off below the instruction: after a line ending in a colon, a blank line or
# a line break. It counts as material when the instruction points at it or when it is
# PASTE_RATIO times as long as an instruction of at most PASTE_MAX_INSTRUCTION characters.
_BLOCK = re.compile(r":[ \t]*\n|\n[ \t]*\n|\n")
PASTE_MAX_INSTRUCTION = 300
PASTE_RATIO = 3
_COLON_INLINE = re.compile(r":[ \t]+(?=\S)")
_QUOTED = re.compile(r"(['\"“‘])([^'\"“”‘’\n]{40,})(['\"”’])")

_HARD = {
    "proof": re.compile(
        r"\b(prove|proof|disprove|show that|derive|derivation|demonstrate that|"
        r"justify|theorem|lemma)\b",
        re.I,
    ),
    "design": re.compile(
        r"\b(design|architect(?:ure)?|scal(?:e|able|ing) to|threat model|specification|"
        r"protocol)\b",
        re.I,
    ),
    "analysis": re.compile(
        r"\b(analy[sz]e|analysis|assess|evaluate|diagnose|critique|compare|trade-?offs?|"
        r"explain\b[^.?!]{0,40}\b(?:why|how)|why (?:is|does|do|are)|what goes wrong|"
        r"find (?:every|all|the) (?:bugs?|errors?|flaws?)|estimate|model (?:both|the)|"
        r"differential|implications?)\b",
        re.I,
    ),
    "build": re.compile(
        r"\b(implement|write (?:a|an|the)\s+(?:\w+\s+){0,3}(?:function|program|class|"
        r"compiler|interpreter|parser|engine|collector|algorithm|pass|server|library|"
        r"implementation|specification)|refactor|optimi[sz]e|algorithm|data structures?)\b",
        re.I,
    ),
}
# Mathematics beyond one operation: solving, computing an object, expectations.
_MATH_ASK = re.compile(
    r"\b(solve|compute|find all|expected (?:number|value)|probability (?:that|of)|"
    r"how many ways|integral|derivative|eigen\w*|recurrence)\b",
    re.I,
)
# The options of a multiple-choice question ("A. ...", "(B) ...", "C) ..."): part of the
# question, not material to edit, and a choice question is never a lookup or an edit.
_OPTION = re.compile(r"^[ \t]*\(?[A-J][.)][ \t]", re.M)
_OPTION_LINE = re.compile(r"^[ \t]*\(?[A-J][.)][ \t].*$\n?", re.M)
MIN_OPTIONS = 3
# A quantity: 12, 3.5, 1,200, 4%, 9:40, $30 (not the digits inside a word such as x86).
_QUANTITY = re.compile(r"(?<![\w.])\$?\d+(?:[.,:]\d+)*%?(?![\w])")
# A word problem with this many quantities in its instruction takes several steps.
PROBLEM_MIN_QUANTITIES = 4
# Clerical operations on the material: the answer is the material, changed as told.
_EDIT = re.compile(
    r"\b(rewrite|reword|rephrase|reformat|format|replace|rename|change|convert|turn|"
    r"sort|capitali[sz]e|lowercase|uppercase|indent|fix (?:the )?(?:spelling|typos|"
    r"capital|capitalisation|capitalization|punctuation|grammar)|correct|proofread|"
    r"put|number|split|merge|shorten|delete|remove|add|insert|copy|extract|pull|list|"
    r"count|underline|bold|give (?:this|it) a (?:title|headline)|title|headline|"
    r"summari[sz]e|translate|make (?:this|it)|which rows|what (?:date|time|email|name|"
    r"number)|who (?:scored|is mentioned)|how many)\b",
    re.I,
)
_SMALLTALK = re.compile(
    r"^\W*(hi|hello|hey|hiya|thanks|thank you|cheers|good (?:morning|afternoon|evening|"
    r"night)|bye|goodbye|see you|nice to meet you|ok(?:ay)?|cool|great)\b",
    re.I,
)
_LOOKUP = re.compile(
    r"^\W*(what(?:'s| is| are| was| were| does| do)?|who|which|where|when|how (?:many|much|"
    r"long|old|far|do you say)|can you (?:say|tell)|translate|spell|convert|round|add|"
    r"double|halve|define)\b|\bhow (?:many|much)\b",
    re.I,
)
# A lookup or one-step sum is short, with few numbers; longer asks are something else.
LOOKUP_MAX_CHARS = 90
LOOKUP_MAX_QUANTITIES = 3
SMALLTALK_MAX_CHARS = 80


@dataclass(frozen=True)
class Request:
    instruction: str
    material: str

    @property
    def material_share(self) -> float:
        total = len(self.instruction) + len(self.material)
        return len(self.material) / total if total else 0.0


def _pasted(head: str, block: str) -> bool:
    """Whether `block`, set off below the instruction `head`, is material to work on: the
    instruction points at it, or it dwarfs a short instruction."""
    if len(head) > PASTE_MAX_INSTRUCTION:
        return False
    return bool(_DEICTIC.search(head)) or len(block) >= PASTE_RATIO * len(head)


def split_request(text: str) -> Request:
    """(instruction, material) of one request; material is "" when it carries none."""
    material: list[str] = []
    rest = text
    fenced = _FENCE.findall(rest)
    if fenced:
        material.extend(fenced)
        rest = _FENCE.sub(" ", rest)
    below = None
    for m in _BLOCK.finditer(rest):
        if m.start() > PASTE_MAX_INSTRUCTION:
            break  # heads only grow from here: no instruction is this long
        if _pasted(rest[: m.start()], rest[m.end() :]):
            below = m
            break
    paragraphs = re.split(r"\n[ \t]*\n", rest.strip())
    tail = paragraphs[-1] if len(paragraphs) > 1 else ""
    tail_asks = bool(tail) and len(tail) <= PASTE_MAX_INSTRUCTION
    tail_asks = tail_asks and len(rest) - len(tail) >= PASTE_RATIO * len(tail)
    if below is not None and tail_asks and tail.rstrip().endswith("?"):
        # a question after the material beats a first line that does not ask ("Dear Ann,")
        tail_asks = not rest[: below.start()].rstrip().endswith(("?", ":"))
        below = None if tail_asks else below
    if below is not None:
        material.append(rest[below.end() :])
        rest = rest[: below.start() + 1]
    elif tail_asks:
        # the material first, then a short instruction about it
        material.append(rest.strip()[: -len(tail)])
        rest = tail
    else:
        inline = _COLON_INLINE.search(rest)
        head = rest[: inline.start()] if inline else ""
        if inline and "\n" not in head and _DEICTIC.search(head):
            material.append(rest[inline.end() :])
            rest = rest[: inline.start() + 1]
    quoted = [m.group(2) for m in _QUOTED.finditer(rest)]
    if quoted and _DEICTIC.search(_QUOTED.sub(" ", rest)):
        material.extend(quoted)
        rest = _QUOTED.sub(" ", rest)
    return Request(rest.strip(), "\n".join(m.strip() for m in material if m.strip()))


def ask_kind(text: str) -> str:
    """What the request asks for (one of ASK_KINDS), from its instruction alone.

    A hard ask (proof, design, analysis, build, problem) wins over an edit: "rewrite it
    safely" after "find every bug" is debugging. An edit needs material to edit. The
    options of a multiple-choice question are read as part of it, never as material."""
    choice = len(_OPTION.findall(text)) >= MIN_OPTIONS
    if choice:
        text = _OPTION_LINE.sub("", text)
    request = split_request(text)
    instruction = request.instruction
    for kind, pattern in _HARD.items():
        if pattern.search(instruction):
            return kind
    quantities = len(_QUANTITY.findall(instruction))
    if quantities >= PROBLEM_MIN_QUANTITIES or _MATH_ASK.search(instruction):
        return "problem"
    if choice:
        return "other"
    if request.material and _EDIT.search(instruction):
        return "edit"
    if len(instruction) <= SMALLTALK_MAX_CHARS and _SMALLTALK.search(instruction):
        return "smalltalk"
    short = len(instruction) <= LOOKUP_MAX_CHARS and quantities <= LOOKUP_MAX_QUANTITIES
    if short and _LOOKUP.search(instruction):
        return "lookup"
    return "other"
