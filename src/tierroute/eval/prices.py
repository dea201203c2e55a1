"""Per-token prices for outcome files that carry no dollar cost (MMLU-Pro, Arena-Hard).

Quality numbers always come from the files; only the cost axis comes from here. API
models use their provider's list price (USD per million input / output tokens, the
price at or near the model version's release). Open-weights models use one published
schedule, Together AI's 2024 serverless price by parameter count, so that every open
model is priced by the same rule rather than by whoever hosts it cheapest:

    dense  <= 4B $0.10, 4-8B $0.20, 8-21B $0.30, 21-41B $0.80, 41-80B $0.90, 80-110B $1.80
    MoE    <= 56B total $0.60, 56-176B total $1.20     (per million tokens, in = out)

Quantised or fine-tuned variants are priced as their base size. Models whose size or
price is not published (several Arena-Hard research checkpoints) have no entry, and the
evaluation leaves their columns out and names them.

The figures were written down from the providers' published price pages as remembered
when this table was made (this machine cannot fetch them): check them before citing a
dollar figure; the evaluation's shares move with them.

A query's cost is input tokens (prompt characters / 4) times the input price plus an
assumed answer length times the output price (`OUTPUT_TOKENS`, per file).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    input: float  # USD per million input tokens
    output: float  # USD per million output tokens
    basis: str  # where the figure comes from

    def per_query(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1e6


def _size(usd: float, bracket: str) -> Price:
    return Price(usd, usd, f"open weights, {bracket}: size schedule ${usd:.2f}/M")


_D4, _D8 = _size(0.10, "<=4B"), _size(0.20, "4-8B")
_D21, _D41 = _size(0.30, "8-21B"), _size(0.80, "21-41B")
_D80, _D110 = _size(0.90, "41-80B"), _size(1.80, "80-110B")
_MOE56, _MOE176 = _size(0.60, "MoE <=56B"), _size(1.20, "MoE 56-176B")

PRICES: dict[str, Price] = {
    # ---- MMLU-Pro
    "gpt-4o-2024-05-13": Price(5.0, 15.0, "OpenAI list price, May 2024"),
    "gemini-1.5-pro-002": Price(1.25, 5.0, "Google list price (<=128k), Oct 2024"),
    "gemini-1.5-flash-002": Price(0.075, 0.30, "Google list price (<=128k), Oct 2024"),
    "jamba-1.5-large": Price(2.0, 8.0, "AI21 list price, Aug 2024"),
    "DeepSeek-Coder-V2": Price(0.14, 0.28, "DeepSeek API list price, 2024"),
    "c4ai-command-r-v01": Price(0.50, 1.50, "Cohere Command R list price, Mar 2024"),
    "Phi-3-mini-4k-instruct": _D4,
    "Llama-2-7b-hf": _D8,
    "Meta-Llama-3-8B": _D8,
    "Meta-Llama-3_1-8B": _D8,
    "Meta-Llama-3_1-8B-Instruct": _D8,
    "Mistral-7B-Instruct-v0.1": _D8,
    "Mistral-7B-Instruct-v0.2": _D8,
    "Mistral-7B-v0.1": _D8,
    "Mistral-7B-v0.2-hf": _D8,
    "mathstral-7B": _D8,
    "Qwen1.5-7B-Chat": _D8,
    "Yi-6B": _D8,
    "Yi-6b-Chat": _D8,
    "gemma-7b": _D21,  # 8.5B parameters
    "Llama-2-13b-hf": _D21,
    "Yi-34B": _D41,
    "Llama-2-70b-hf": _D80,
    "Meta-Llama-3-70B": _D80,
    "Meta-Llama-3_1-70B": _D80,
    "Meta-Llama-3_1-70B-Instruct": _D80,
    "Qwen1.5-72B-Chat": _D80,
    "Qwen1.5-110B": _D110,
    "Mixtral-8x7B-Instruct-v0.1": _MOE56,
    "Mixtral-8x7B-v0.1": _MOE56,
    # ---- Arena-Hard, judge gpt-4o
    "gpt-4o": Price(5.0, 15.0, "OpenAI list price, May 2024"),
    "gpt-4o-mini": Price(0.15, 0.60, "OpenAI list price, Jul 2024"),
    "gpt-3.5-turbo-0125": Price(0.50, 1.50, "OpenAI list price, Jan 2024"),
    "claude-3-5-sonnet-20240620": Price(3.0, 15.0, "Anthropic list price, Jun 2024"),
    "claude-3-opus-20240229": Price(15.0, 75.0, "Anthropic list price, Mar 2024"),
    "gemini-1.5-pro-api-0514": Price(3.5, 10.5, "Google list price (<=128k), May 2024"),
    "mistral-large-2407": Price(3.0, 9.0, "Mistral list price, Jul 2024"),
    "mistral_large_2_guided": Price(3.0, 9.0, "Mistral Large 2 list price, Jul 2024"),
    "llama-3.1-405b-instruct": Price(5.0, 5.0, "Together AI Llama 3.1 405B price, Jul 2024"),
    "gemma-2-27b-it": _D41,
    "llama3_1_70b": _D80,
    "llama3_1_70b_awq4": _D80,
    "llama3_1_70b_awq_int4": _D80,
    "llama3_1_70b_fp8": _D80,
    "llama3_1_70b_fp8_1": _D80,
    "llama3_1_70b_fp8_2": _D80,
    "llama3_70b": _D80,
    "llama3_1_8b": _D8,
    "llama3_1_8b_guided": _D8,
    "mistral_nemo": _D21,  # 12B
    "mistral_nemo_fp8": _D21,
    "mistral_nemo_fp8_guided": _D21,
    "mistral_nemo_guided": _D21,
    "mixtral-8x22b-instruct-v0.1": _MOE176,
    # ---- Arena-Hard, judge gpt-4-1106-preview
    "gpt-4-0613": Price(30.0, 60.0, "OpenAI list price, Jun 2023"),
    "Mistral-Large-Instruct-2407": Price(3.0, 9.0, "Mistral list price, Jul 2024"),
    "Mistral-Small-24B-Instruct-2501": Price(0.10, 0.30, "Mistral list price, Jan 2025"),
    "Qwen2.5-72B-Instruct": _D80,
    "Athene-V2-Chat": _D80,  # a Qwen2.5-72B fine-tune
    "qwen-2p5-72b-Blocks-v4-250225": _D80,
    "Llama-3-Base-8B-DPO-UltraFeedback": _D8,
    "Llama-3-Base-8B-IPO-UltraFeedback": _D8,
    "Llama-3-Base-8B-SFT-Ultrachat": _D8,
    "Llama-3-Base-8B-TR_DPO-Alpha_0.6-UltraFeedback": _D8,
    "Llama-3-Base-8B-TR_DPO-Tau_256-UltraFeedback": _D8,
    "Llama-3-Base-8B-TR_IPO-Alpha_0.6-UltraFeedback": _D8,
}

# Published parameter counts (billions) of the open-weights models above: the other axis
# the issue allows ("dollar (or model-size) range"), which needs no price table at all.
# Mixture-of-experts models count every expert (what a host must hold in memory):
# Mixtral-8x7B 46.7B (12.9B active), Mixtral-8x22B 141B (39B active). Closed models
# publish no size and have no entry; quantised, guided or fine-tuned variants count as
# their base model.
SIZES_B: dict[str, float] = {
    "Phi-3-mini-4k-instruct": 3.8,
    "Llama-2-7b-hf": 7.0,
    "Meta-Llama-3-8B": 8.0,
    "Meta-Llama-3_1-8B": 8.0,
    "Meta-Llama-3_1-8B-Instruct": 8.0,
    "Mistral-7B-Instruct-v0.1": 7.3,
    "Mistral-7B-Instruct-v0.2": 7.3,
    "Mistral-7B-v0.1": 7.3,
    "Mistral-7B-v0.2-hf": 7.3,
    "mathstral-7B": 7.3,
    "Qwen1.5-7B-Chat": 7.7,
    "Yi-6B": 6.1,
    "Yi-6b-Chat": 6.1,
    "gemma-7b": 8.5,
    "Llama-2-13b-hf": 13.0,
    "Yi-34B": 34.4,
    "Llama-2-70b-hf": 70.0,
    "Meta-Llama-3-70B": 70.0,
    "Meta-Llama-3_1-70B": 70.0,
    "Meta-Llama-3_1-70B-Instruct": 70.0,
    "Qwen1.5-72B-Chat": 72.0,
    "Qwen1.5-110B": 111.0,
    "Mixtral-8x7B-Instruct-v0.1": 46.7,
    "Mixtral-8x7B-v0.1": 46.7,
    # Arena-Hard, judge gpt-4o
    "gemma-2-27b-it": 27.2,
    "llama3_1_70b": 70.0,
    "llama3_1_70b_awq4": 70.0,
    "llama3_1_70b_awq_int4": 70.0,
    "llama3_1_70b_fp8": 70.0,
    "llama3_1_70b_fp8_1": 70.0,
    "llama3_1_70b_fp8_2": 70.0,
    "llama3_70b": 70.0,
    "llama3_1_8b": 8.0,
    "llama3_1_8b_guided": 8.0,
    "mistral_nemo": 12.2,
    "mistral_nemo_fp8": 12.2,
    "mistral_nemo_fp8_guided": 12.2,
    "mistral_nemo_guided": 12.2,
    "mixtral-8x22b-instruct-v0.1": 141.0,
    "mistral-large-2407": 123.0,
    "mistral_large_2_guided": 123.0,
    "llama-3.1-405b-instruct": 405.0,
    # Arena-Hard, judge gpt-4-1106-preview
    "Mistral-Large-Instruct-2407": 123.0,
    "Mistral-Small-24B-Instruct-2501": 24.0,
    "Qwen2.5-72B-Instruct": 72.7,
    "Athene-V2-Chat": 72.7,
    "qwen-2p5-72b-Blocks-v4-250225": 72.7,
    "Llama-3-Base-8B-DPO-UltraFeedback": 8.0,
    "Llama-3-Base-8B-IPO-UltraFeedback": 8.0,
    "Llama-3-Base-8B-SFT-Ultrachat": 8.0,
    "Llama-3-Base-8B-TR_DPO-Alpha_0.6-UltraFeedback": 8.0,
    "Llama-3-Base-8B-TR_DPO-Tau_256-UltraFeedback": 8.0,
    "Llama-3-Base-8B-TR_IPO-Alpha_0.6-UltraFeedback": 8.0,
}

# Assumed answer length in tokens: MMLU-Pro is scored on a chain of thought, Arena-Hard
# answers are long-form (its published answer files average several hundred tokens).
OUTPUT_TOKENS: dict[str, int] = {"mmlu_pro": 300, "arenahard_v01": 600}
DEFAULT_OUTPUT_TOKENS = 300


def base_model(column: str) -> str:
    """The model of an Arena-Hard column `model (judge J)`; other names unchanged."""
    return column.split(" (judge ", 1)[0]


def price_of(column: str) -> Price | None:
    return PRICES.get(base_model(column))


def size_of(column: str) -> float | None:
    """Published parameter count in billions, or None (closed or unpublished)."""
    return SIZES_B.get(base_model(column))
