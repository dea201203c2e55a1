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

Token log-probabilities (`complete` with extra={"logprobs": True}) are read from the logits
the sampler just used, one log-softmax per token. llama-cpp-python's own `logprobs` needs
`logits_all=True`, which keeps n_ctx x vocabulary floats (1.2 GB for Qwen's 152k vocabulary
at n_ctx 2048) and computes logits for every prompt token; this costs neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierroute.backends.base import BackendError, ChatRequest, ChatResult, StreamDelta
from tierroute.errors import MissingDependencyError

INSTALL_HINT = (
    "Local models need llama-cpp-python; build it for this CPU with: "
    'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON '
    '-DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" '
    "pip install --no-cache-dir llama-cpp-python==0.3.36"
)

# OpenAI chat parameters in ChatRequest.extra that llama-cpp-python understands too.
_PASSTHROUGH = ("seed", "presence_penalty", "frequency_penalty", "response_format")


class _Cancelled(Exception):
    """Raised inside the worker thread to abandon a generation nobody waits for."""


@dataclass
class _Job:
    """One request's state, shared between the event loop and the worker thread."""

    request: ChatRequest
    deadline: float  # time.monotonic()
    cancel: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    sampled: int = 0
    last_token: int | None = None
    logprobs: list[float] | None = None  # one per sampled token, when the request asks


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
    ) -> None:
        self.name = name
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
        job = _Job(
            request,
            deadline=time.monotonic() + timeout,
            logprobs=[] if request.extra.get("logprobs") else None,
        )
        pieces: list[str] = []
        try:
            final = await asyncio.wait_for(
                _in_thread(lambda: self._generate(job, lambda d: pieces.append(d.text))),
                timeout,
            )
        except TimeoutError:
            raise self._timeout(timeout) from None
        finally:
            job.cancel.set()  # a no-op when done; stops a generation that timed out
        completion = final.completion_tokens or 0
        return ChatResult(
            text="".join(pieces) + final.text,
            finish_reason=final.finish_reason or "stop",
            prompt_tokens=final.prompt_tokens or 0,
            completion_tokens=completion,
            model=self.model_path.stem,
            # Without a final end-of-generation token's, like completion_tokens.
            token_logprobs=None if job.logprobs is None else tuple(job.logprobs[:completion]),
        )

    async def stream(self, request: ChatRequest, timeout: float) -> AsyncIterator[StreamDelta]:
        loop = asyncio.get_running_loop()
        job = _Job(request, deadline=time.monotonic() + timeout)
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
            "messages": req.messages,
            "max_tokens": req.max_tokens or self.max_tokens_default,
            "stream": True,
        }
        if req.temperature is not None:
            kwargs["temperature"] = req.temperature
        if req.top_p is not None:
            kwargs["top_p"] = req.top_p
        if req.stop:
            kwargs["stop"] = list(req.stop)
        kwargs.update({k: req.extra[k] for k in _PASSTHROUGH if k in req.extra})
        finish: str | None = None
        try:
            chunks = llm.create_chat_completion(**kwargs)
            try:
                for chunk in chunks:
                    if job.cancel.is_set():
                        raise _Cancelled
                    choice = chunk["choices"][0]
                    text = choice["delta"].get("content") or ""
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
        if self.chat_format is None and "tokenizer.chat_template" not in llm.metadata:
            llm.close()
            raise BackendError(
                f"{self.model_path.name} has no chat template, so tier {self.name!r} would "
                "answer with empty text; pass chat_format= (e.g. 'chatml') or use an "
                "instruct model.",
                retryable=False,
            )
        self._llm = llm
        return llm


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
                        job.logprobs.append(self.logprob(token))
                    if job.cancel.is_set():
                        raise _Cancelled
                    yield token
            finally:
                inner.close()

        def logprob(self, token: int) -> float:
            """log P(token) under the logits it was just sampled from (the sampler works on
            a copy, so these are the model's own, before temperature or penalties)."""
            logits = np.ctypeslib.as_array(
                self._ctx.get_logits_ith(-1), shape=(self._n_vocab,)
            ).astype(np.float64)
            top = float(logits.max())
            return float(logits[token] - top - np.log(np.exp(logits - top).sum()))

        def is_eog(self, token: int) -> bool:
            vocab = llama_cpp.llama_model_get_vocab(self.model)
            return vocab is not None and bool(llama_cpp.llama_vocab_is_eog(vocab, token))

    _METERED = MeteredLlama
    return MeteredLlama
