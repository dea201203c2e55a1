"""Published figures to print beside ours (RouteLLM paper, Table 2, MMLU, GPT-4 vs Mixtral)."""

from __future__ import annotations

PUBLISHED: dict[tuple[str, str, str], dict[str, dict[str, float]]] = {
    ("routellm_evals", "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"): {
        "RouteLLM random (published)": {"cpt50": 0.5007, "apgr": 0.500},
        "RouteLLM best, in-domain labels (published)": {
            "cpt50": 0.3540,
            "cpt80": 0.7031,  # the best of the range 70.31-71.55% reported
            "apgr": 0.603,
        },
    },
}


def published_for(dataset: str, small: str, large: str) -> dict[str, dict[str, float]]:
    return PUBLISHED.get((dataset, small, large), {})
