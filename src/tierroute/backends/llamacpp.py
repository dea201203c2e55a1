"""A local GGUF model run in-process by llama-cpp-python.

llama.cpp is not thread-safe, so each backend (one model) owns one lock, and every load,
generation and close happens in a worker thread that holds it. The event loop only waits:
`complete` awaits the thread's result, `stream` receives deltas through an asyncio.Queue
fed with `loop.call_soon_threadsafe` as tokens come out.

Stopping: a timeout, a cancelled caller or a consumer that closes the stream sets a flag
that the worker checks after every sampled token; generation then ends and the lock is
released. (The prompt is evaluated in one C call, which cannot be interrupted.)

Usage is counted from the tokens themselves, streamed or not: the prompt as tokenized by
the model's chat template, and every sampled token except a final end-of-generation token,
which is how llama-cpp-python counts a non-streamed answer.

Token log-probabilities (`complete` with extra={"logprobs": True}, and top_logprobs) are read
from the logits the sampler just used, one log-softmax per token. llama-cpp-python's own
`logprobs` needs `logits_all=True`, which keeps n_ctx x vocabulary floats (1.2 GB for
Qwen's 152k vocabulary at n_ctx 2048) and computes logits for every prompt token; this
costs neither.

A base model (no chat template) runs with `few_shot` (tierroute.backends.few_shot): the
request's last user message is asked in a few-shot completion prompt and the answer is one
line; tools and response formats are refused for it, with 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tierroute.backends.base import (
    BackendError,
    ChatRequest,
    ChatResult,
    StreamDelta,
    Unsupported,
)
from tierroute.backends.few_shot import FewShot
from tierroute.backends.local_params import (
    CHOICE_TOKENS,
    LocalPlan,
    choice_step,
    plan,
    resolved,
)
from tierroute.errors import MissingDependencyError

INSTALL_HINT = (
    "Local models need llama-cpp-python; build it for this CPU with: "
    'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON '
    '-DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" '
    "pip install --no-cache-dir llama-cpp-python==0.3.36"
)


class _Cancelled(Exception):
    """Raised inside the worker thread to abandon a generation nobody waits for."""


@dataclass
class _Job:
    """One request's state, shared between the event loop and the worker thread."""

    request: ChatRequest
    deadline: float  # time.monotonic()
    plan: LocalPlan
    cancel: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    sampled: int = 0
    last_token: int | None = None
    logprobs: list[float] | None = None  # one per sampled token, when the request asks
    top: int = 0  # how many alternatives per token (top_logprobs)
    # Per sampled token, when logprobs are asked: (token, its top alternatives).
    tokens: list[tuple[int, list[tuple[int, float]]]] = field(default_factory=list)


class LlamaCppBackend:
    """One local model behind the Backend interface; loads on first use (or `load()`)."""

    def __init__(
        self,
        name: str,
        model_path: str | Path,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        chat_format: str | None = None,
        max_tokens_default: int = 256,
        few_shot: FewShot | None = None,
    ) -> None:
        self.name = name
        self.few_shot = few_shot  # a base model: answered by few-shot completion
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads  # None: llama.cpp's default (half the cores)
        self.chat_format = chat_format
        self.max_tokens_default = max_tokens_default
        self._lock = threading.Lock()
        self._llm: Any = None  # a _MeteredLlama once loaded

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def load(self) -> None:
        """Load the model now (blocking); otherwise the first request does it."""
        with self._lock:
            self._ensure_loaded()

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                llm.close()

    async def complete(self, request: ChatRequest, timeout: float) -> ChatResult:
        """One answer, or `n` sampled in turn (a seed moves by one per answer)."""
        local = self._plan(request, stream=False)
        deadline = time.monotonic() + timeout
        local, spent = await self._choose_tool(request, local, deadline, timeout, stream=False)
        answers: list[tuple[_Job, str, StreamDelta]] = []
        for i in range(local.n):
            seed = local.kwargs.get("seed")
            kwargs = local.kwargs if seed is None else {**local.kwargs, "seed": seed + i}
            job = _Job(
                request,
                deadline=deadline,
                plan=replace(local, kwargs=kwargs),
                logprobs=[] if local.logprobs else None,
                top=local.top_logprobs,
            )
            text, final = await self._answer(job, timeout)
            answers.append((job, text, final))
        choices = [self._choice(i, *answer) for i, answer in enumerate(answers)]
        first_job, text, final = answers[0]
        completion = final.completion_tokens or 0
        return ChatResult(
            text="" if local.tool else text,
            finish_reason=choices[0]["finish_reason"],
            prompt_tokens=(final.prompt_tokens or 0) + spent[0],
            completion_tokens=sum(f.completion_tokens or 0 for _, _, f in answers) + spent[1],
            model=self.model_path.stem,
            # Without a final end-of-generation token's, like completion_tokens.
            token_logprobs=(
                None if first_job.logprobs is None else tuple(first_job.logprobs[:completion])
            ),
            choices=choices,
        )

    def _plan(self, request: ChatRequest, stream: bool) -> LocalPlan:
        local = plan(request, self.name, stream)
        if self.few_shot is not None and (local.tools or local.tool or local.grammar):
            param = "tools" if local.tools or local.tool else "response_format"
            raise Unsupported(
                f"Tier {self.name!r} is a base model answering one line few-shot; it takes "
                f"no '{param}'. Drop it or name a chat tier.",
                param=param,
            )
        return local

    async def _choose_tool(
        self, request: ChatRequest, local: LocalPlan, deadline: float, timeout: float, stream: bool
    ) -> tuple[LocalPlan, tuple[int, int]]:
        """tool_choice auto: the first step names a function or none (local_params), and
        the request goes on forced to it or as text. Returns the plan for the answer and
        the (prompt, completion) tokens the step took."""
        if not local.choose:
            return local, (0, 0)
        messages, grammar, none = choice_step(local)
        step = _Job(
            ChatRequest(messages, max_tokens=CHOICE_TOKENS, temperature=0.0),
            deadline=deadline,
            plan=LocalPlan(messages=messages, grammar=grammar),
        )
        picked, final = await self._answer(step, timeout)
        if picked not in local.choose and picked != none:
            raise BackendError(  # the grammar allows nothing else: a broken sampler
                f"Local model {self.name!r} chose {picked!r}, not one of the tools; retry.",
                retryable=True,
            )
        answer = plan(resolved(request, picked, local), self.name, stream)
        return answer, (final.prompt_tokens or 0, final.completion_tokens or 0)

    async def _answer(self, job: _Job, timeout: float) -> tuple[str, StreamDelta]:
        pieces: list[str] = []
        try:
            final = await asyncio.wait_for(
                _in_thread(lambda: self._generate(job, lambda d: pieces.append(d.text))),
                max(job.deadline - time.monotonic(), 0.0),
            )
        except TimeoutError:
            raise self._timeout(timeout) from None
        finally:
            job.cancel.set()  # a no-op when done; stops a generation that timed out
        return "".join(pieces) + final.text, final

    def _choice(self, index: int, job: _Job, text: str, final: StreamDelta) -> dict[str, Any]:
        """One OpenAI choice: the text, or the forced tool's call; logprobs when asked."""
        finish = final.finish_reason or "stop"
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if job.plan.tool is not None:
            call = {k: v for k, v in _call(job, text).items() if k != "index"}  # not a delta
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish = "tool_calls" if finish == "stop" else finish
        logprobs = None
        if job.logprobs is not None and self._llm is not None:
            kept = job.tokens[: final.completion_tokens or 0]
            logprobs = {"content": _logprob_items(self._llm, kept, job.logprobs, job.top)}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    async def stream(self, request: ChatRequest, timeout: float) -> AsyncIterator[StreamDelta]:
        loop = asyncio.get_running_loop()
        local = self._plan(request, stream=True)
        deadline = time.monotonic() + timeout
        local, spent = await self._choose_tool(request, local, deadline, timeout, stream=True)
        job = _Job(request, deadline=deadline, plan=local)
        call = _call(job, "") if local.tool is not None else None
        queue: asyncio.Queue[StreamDelta | BaseException | None] = asyncio.Queue()

        def send(item: StreamDelta | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                job.cancel.set()

        def work() -> None:
            try:
                send(self._generate(job, send))
            except _Cancelled:
                pass
            except BaseException as exc:
                send(exc)
            finally:
                send(None)

        threading.Thread(target=work, name=f"llamacpp-{self.name}", daemon=True).start()
        try:
            while True:
                remaining = job.deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(queue.get(), max(remaining, 0.0))
                except TimeoutError:
                    raise self._timeout(timeout) from None
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None and spent != (0, 0):
                    item = replace(
                        item,
                        prompt_tokens=(item.prompt_tokens or 0) + spent[0],
                        completion_tokens=(item.completion_tokens or 0) + spent[1],
                    )
                if call is not None:
                    item = _as_tool_delta(item, call)
                    call = {"index": 0, "function": {}}  # later chunks: arguments only
                yield item
        finally:
            job.cancel.set()

    def _timeout(self, timeout: float) -> BackendError:
        return BackendError(
            f"Local model {self.name!r} did not finish within {timeout:g}s; raise the tier's "
            "timeout, lower max_tokens or route to a faster tier.",
            retryable=True,
        )

    # --- worker thread -------------------------------------------------------------------

    def _generate(self, job: _Job, emit: Callable[[StreamDelta], None]) -> StreamDelta:
        """Run one request under the model lock; emit text pieces, return the final delta."""
        if not self._lock.acquire(timeout=max(job.deadline - time.monotonic(), 0.0)):
            raise _Cancelled  # the caller has timed out already
        try:
            if job.cancel.is_set():
                raise _Cancelled
            llm = self._ensure_loaded()
            llm.job = job
            try:
                return self._run(llm, job, emit)
            finally:
                llm.job = None
        finally:
            self._lock.release()

    def _run(self, llm: Any, job: _Job, emit: Callable[[StreamDelta], None]) -> StreamDelta:
        req = job.request
        kwargs: dict[str, Any] = {
            **job.plan.kwargs,
            "max_tokens": req.limit or self.max_tokens_default,
            "stream": True,
        }
        stops = list(req.stop or ())
        if self.few_shot is None:
            kwargs["messages"] = job.plan.messages
        else:
            kwargs["prompt"] = self.few_shot.render(job.plan.messages)
            stops += [s for s in self.few_shot.stop if s not in stops]
        if req.temperature is not None:
            kwargs["temperature"] = req.temperature
        if req.top_p is not None:
            kwargs["top_p"] = req.top_p
        if stops:
            kwargs["stop"] = stops
        finish: str | None = None
        try:
            if job.plan.grammar is not None:
                from llama_cpp.llama_grammar import LlamaGrammar

                kwargs["grammar"] = LlamaGrammar.from_string(job.plan.grammar, verbose=False)
            if self.few_shot is None:
                chunks = llm.create_chat_completion(**kwargs)
            else:
                chunks = llm.create_completion(**kwargs)
            try:
                for chunk in chunks:
                    if job.cancel.is_set():
                        raise _Cancelled
                    choice = chunk["choices"][0]
                    if self.few_shot is None:
                        text = choice["delta"].get("content") or ""
                    else:
                        text = choice.get("text") or ""
                    if text:
                        emit(StreamDelta(text=text))
                    finish = choice.get("finish_reason") or finish
            finally:
                chunks.close()
        except (_Cancelled, BackendError):
            raise
        except ValueError as exc:  # e.g. the prompt does not fit in n_ctx
            raise BackendError(
                f"Local model {self.name!r} rejected the request ({exc}); shorten the "
                f"conversation or raise n_ctx (now {self.n_ctx}).",
                retryable=False,
                status=400,
            ) from exc
        except Exception as exc:
            raise BackendError(
                f"Local model {self.name!r} failed while generating ({exc!r}); retry, or "
                "reload the tier if it keeps failing.",
                retryable=True,
            ) from exc
        completion = job.sampled
        if job.last_token is not None and llm.is_eog(job.last_token):
            completion -= 1  # the end-of-generation token is not part of the answer
        return StreamDelta(
            text="",
            finish_reason=finish or "stop",
            prompt_tokens=job.prompt_tokens,
            completion_tokens=completion,
        )

    def _ensure_loaded(self) -> Any:
        """Load the model (call with the lock held)."""
        if self._llm is not None:
            return self._llm
        if not self.model_path.is_file():
            raise BackendError(
                f"Model file {self.model_path} for tier {self.name!r} does not exist; "
                "check the tier's model path (tierroute.backends.models.resolve_model "
                "builds the registry's models).",
                retryable=False,
            )
        cls = _metered_llama_class()
        try:
            llm = cls(
                model_path=str(self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                chat_format=self.chat_format,
                verbose=False,
            )
        except Exception as exc:
            raise BackendError(
                f"Could not load {self.model_path} for tier {self.name!r} ({exc}); check "
                "that it is a GGUF file this llama-cpp-python can read.",
                retryable=False,
            ) from exc
        chat = self.chat_format is not None or "tokenizer.chat_template" in llm.metadata
        if self.few_shot is None and not chat:
            llm.close()
            raise BackendError(
                f"{self.model_path.name} has no chat template, so tier {self.name!r} would "
                "answer with empty text; pass chat_format= (e.g. 'chatml'), few_shot= "
                "(a base model answering one line) or use an instruct model.",
                retryable=False,
            )
        self._llm = llm
        return llm


def _call(job: _Job, arguments: str) -> dict[str, Any]:
    """The tool call a forced-tool answer is: its text is the function's arguments."""
    assert job.plan.tool is not None
    return {
        "index": 0,
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": job.plan.tool, "arguments": arguments},
    }


def _as_tool_delta(delta: StreamDelta, call: dict[str, Any]) -> StreamDelta:
    """A streamed piece of a forced tool call's arguments as an OpenAI tool_calls delta
    (`call` holds id, type and name on the first chunk, the index alone after)."""
    if delta.finish_reason is not None:
        finish = "tool_calls" if delta.finish_reason == "stop" else delta.finish_reason
        return replace(delta, finish_reason=finish)
    function = {**call["function"], "arguments": delta.text}
    head = {"role": "assistant", "content": None} if "id" in call else {}
    choice = {
        "index": 0,
        "delta": {**head, "tool_calls": [{**call, "function": function}]},
        "logprobs": None,
        "finish_reason": None,
    }
    return StreamDelta(text="", choices=[choice])


def _logprob_items(
    llm: Any, tokens: list[tuple[int, list[tuple[int, float]]]], logprobs: list[float], k: int
) -> list[dict[str, Any]]:
    """OpenAI's logprobs.content entries: token text, logprob, bytes, top alternatives."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        raw = bytes(llm.detokenize([token]))
        return {
            "token": raw.decode("utf-8", "replace"),
            "logprob": logprob,
            "bytes": list(raw),
        }

    return [
        {**item(token, lp), "top_logprobs": [item(t, v) for t, v in top[:k]]}
        for (token, top), lp in zip(tokens, logprobs, strict=False)
    ]


def _in_thread(fn: Callable[[], StreamDelta]) -> asyncio.Future[StreamDelta]:
    """Run `fn` in a dedicated daemon thread (not the shared executor, which a model
    waiting on its lock could starve) and return a future for its result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[StreamDelta] = loop.create_future()

    def settle(result: StreamDelta | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)

    def work() -> None:
        result: StreamDelta | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except _Cancelled:
            return
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="llamacpp-complete", daemon=True).start()
    return future


_METERED: type[Any] | None = None


def _metered_llama_class() -> type[Any]:
    """A Llama subclass whose `generate` counts tokens and honours the job's cancel flag.

    Built on first use so that importing this module never imports llama_cpp.
    """
    global _METERED
    if _METERED is not None:
        return _METERED
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingDependencyError(INSTALL_HINT) from exc

    class MeteredLlama(llama_cpp.Llama):
        job: _Job | None = None

        def generate(
            self, tokens: Sequence[int], *args: Any, **kwargs: Any
        ) -> Generator[int, Sequence[int] | None, None]:
            job = self.job
            if job is None:
                return (yield from super().generate(tokens, *args, **kwargs))
            if job.cancel.is_set():
                raise _Cancelled
            job.prompt_tokens = len(tokens)
            inner = super().generate(tokens, *args, **kwargs)
            try:
                for token in inner:
                    job.sampled += 1
                    job.last_token = token
                    if job.logprobs is not None:
                        logprob, top = self.logprobs(token, job.top)
                        job.logprobs.append(logprob)
                        job.tokens.append((token, top))
                    if job.cancel.is_set():
                        raise _Cancelled
                    yield token
            finally:
                inner.close()

        def logprobs(self, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
            """log P(token) under the logits it was just sampled from (the sampler works on
            a copy, so these are the model's own, before temperature or penalties), and
            the k likeliest tokens with theirs."""
            logits = np.ctypeslib.as_array(
                self._ctx.get_logits_ith(-1), shape=(self._n_vocab,)
            ).astype(np.float64)
            top = float(logits.max())
            norm = top + float(np.log(np.exp(logits - top).sum()))
            best: list[tuple[int, float]] = []
            if k:
                ids = np.argpartition(-logits, k)[:k]
                ids = ids[np.argsort(-logits[ids])]
                best = [(int(i), float(logits[i] - norm)) for i in ids]
            return float(logits[token] - norm), best

        def is_eog(self, token: int) -> bool:
            vocab = llama_cpp.llama_model_get_vocab(self.model)
            return vocab is not None and bool(llama_cpp.llama_vocab_is_eog(vocab, token))

    _METERED = MeteredLlama
    return MeteredLlama
