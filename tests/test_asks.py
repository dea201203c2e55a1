"""What a request asks for, read from its instruction with the pasted material set aside."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierroute.asks import ask_kind, split_request
from tierroute.conversation import routing_text
from tierroute.errors import ConfigError
from tierroute.routers.rules import RulesRouter, load_rules

LETTER = (
    "Dear Ms Lund,\n\nYour parcel 7781 was delivered on 4 May to the address we hold for you. "
    "If it has not reached you, please reply within 14 days and we will open an enquiry with "
    "the courier. We are sorry for any trouble this has caused.\n\nKind regards,\nParcels Team"
)


def test_material_below_an_instruction_that_points_at_it() -> None:
    request = split_request("Underline nothing, just fix the typos in this letter:\n" + LETTER)
    assert request.instruction == "Underline nothing, just fix the typos in this letter:"
    assert request.material.startswith("Dear Ms Lund")
    assert request.material_share > 0.7


def test_long_block_under_a_short_instruction_is_material_without_pointing() -> None:
    request = split_request("Swap the greeting for 'Hello Anna'\n\n" + LETTER)
    assert request.instruction == "Swap the greeting for 'Hello Anna'"
    assert "parcel 7781" in request.material


def test_material_first_then_a_short_question() -> None:
    request = split_request(LETTER + "\n\nWhich day was it delivered?")
    assert request.instruction == "Which day was it delivered?"
    assert "Parcels Team" in request.material


def test_requirements_after_a_colon_stay_in_the_instruction() -> None:
    text = (
        "Design a payments ledger for 50 banks. Cover: idempotent transfers, double-entry "
        "invariants, reconciliation with the central bank, and audit."
    )
    assert split_request(text) == split_request(text)  # pure
    assert split_request(text).material == ""


def test_fenced_code_and_long_quotations_are_material() -> None:
    code = split_request("What does this print?\n```python\nprint(sum(range(4)))\n```")
    assert code.instruction == "What does this print?"
    assert "print(sum" in code.material
    quoted = split_request("Put this in title case: 'the wind in the willows by kenneth grahame'")
    assert quoted.instruction == "Put this in title case:"
    assert "kenneth grahame" in quoted.material


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Prove that there is no largest even number.", "proof"),
        ("Design an inventory service for 300 warehouses.", "design"),
        ("Compare the two treaties and analyse their effect on trade.", "analysis"),
        ("Implement a trie with deletion in Go.", "build"),
        (
            "A tap fills 3 litres a minute, a leak loses 1; the tub holds 40 and has 4. When?",
            "problem",
        ),
        ("Solve the recurrence a(n) = a(n-1) + 2a(n-2).", "problem"),
        ("Fix the typos in this letter:\n" + LETTER, "edit"),
        (LETTER + "\n\nHow many days do I have to reply?", "edit"),
        ("Who painted the ceiling of the Sistine Chapel?", "lookup"),
        ("How much is 7 plus 6?", "lookup"),
        ("hello again!", "smalltalk"),
        ("Tell me about your favourite season.", "other"),
    ],
)
def test_ask_kind(text: str, kind: str) -> None:
    assert ask_kind(text) == kind


def test_a_hard_ask_wins_over_an_edit_verb() -> None:
    text = "Find every bug in this function and rewrite it so it is thread-safe:\n" + (
        "int take(struct q *q) { int v = q->items[q->head]; q->head++; return v; }\n" * 3
    )
    assert ask_kind(text) == "analysis"


def test_an_edit_needs_material() -> None:
    assert ask_kind("Rewrite the history of Rome as a sonnet sequence.") != "edit"


def test_a_follow_up_reads_the_latest_turn() -> None:
    convo = [
        {"role": "user", "content": "Write a long story about a fox. " * 20},
        {"role": "assistant", "content": "Once upon a time, a fox ... " * 30},
        {"role": "user", "content": "Now make it shorter."},
    ]
    assert ask_kind(routing_text(convo)) == "edit"


def test_ask_rules(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text("bias: 0\nrules:\n  - {name: edits, ask: [edit, lookup], weight: -2}\n")
    router = RulesRouter(load_rules(f))  # no tagger needed for `ask`
    explained = router.explain([{"role": "user", "content": "Fix the typos in this:\n" + LETTER}])
    assert explained.reasons == ("rule edits (-2.0)",)
    assert explained.tags == {"ask": "edit"}
    assert router.score("Prove that 7 is prime.") == pytest.approx(0.5)
    f.write_text("rules:\n  - {ask: clerical, weight: -2}\n")
    with pytest.raises(ConfigError, match="unknown ask kinds clerical"):
        load_rules(f)


def test_options_of_a_choice_question_are_not_material() -> None:
    question = "Which of these gases is a noble gas?\nA. Oxygen\nB. Argon\nC. Nitrogen\nD. Hydrogen"
    assert ask_kind(question) == "other"  # not a lookup, not an edit of "material"
    sum_question = (
        "A shop sells 12 pens at 3 dollars and 5 at 4. Total?\nA) 56\nB) 60\nC) 48\nD) 52"
    )
    assert ask_kind(sum_question) == "problem"  # the options' numbers are not counted
    assert ask_kind("Prove the claim.\nA. yes\nB. no\nC. maybe") == "proof"
