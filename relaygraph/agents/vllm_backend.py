"""vLLM in-process (``pip install 'relaygraph[vllm]'``): continuous batching and prefix caching
without a server.

One ``AsyncLLM`` engine runs on a private event loop thread; every :meth:`generate` call
(from any thread) submits a request with the rendered token ids and follows its streamed
deltas under the stop rule with the same loop as the server backend
(:func:`relaygraph.agents.decoding.follow`). Concurrent calls are batched by the engine; a
refused token aborts the request. The engine's prefix cache reuses what earlier turns
prefilled, and ``prefilled_tokens`` is the prompt minus the engine's ``num_cached_tokens``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
from collections.abc import Generator, Sequence
from typing import Any, ClassVar, Literal

from relaygraph.agents.backend import Generation, Prompt, Sampling, StopRule, TextCallback
from relaygraph.agents.decoding import Sample, engine_finish, entropy_from_top, follow, token_limit
from relaygraph.agents.registry import AgentConfig
from relaygraph.agents.rendering import Renderer, TokenizerBackend, generation_eos_ids, load_tokenizer
from relaygraph.errors import BackendError, ConfigError

INSTALL_HINT = "pip install 'relaygraph[vllm]'"
_DONE = object()


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(f"the vllm backend needs vLLM ({INSTALL_HINT}; "
                          f"import failed: {str(exc).splitlines()[0]})") from None
    return vllm


class VLLMBackend(TokenizerBackend):
    """A model run by vLLM in this process (GPU users; vLLM's CPU build also works).

    ``model`` is a catalog name, local folder or hub id; ``tokenizer`` where to load the
    tokenizer for rendering from (default: ``model``); ``engine_args`` go to vLLM's
    ``AsyncEngineArgs`` (``dtype``, ``max_model_len``, ``gpu_memory_utilization``,
    ``enable_prefix_caching`` — on by default —, ...). ``top_logprobs`` alternatives per
    token are requested when the stop rule has a ``check`` (for the entropy estimate).
    Call :meth:`close` to shut the engine down.
    """

    def __init__(self, model: str, tokenizer: str | None = None, top_logprobs: int = 20,
                 timeout: float = 600.0, **engine_args: Any) -> None:
        _import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from relaygraph.agents.catalog import resolve

        self.model_id = model
        self.top_logprobs = top_logprobs
        self.timeout = timeout
        """Longest wait for the engine's next output (seconds) before a BackendError."""
        source = tokenizer or model
        self.tokenizer = load_tokenizer(source)
        self.renderer = Renderer(self.tokenizer)
        self.eos_ids = generation_eos_ids(source, self.tokenizer)
        engine_args.setdefault("enable_prefix_caching", True)
        args = AsyncEngineArgs(model=resolve(model), **engine_args)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine",
                                        daemon=True)
        self._thread.start()

        async def start() -> Any:
            return AsyncLLM.from_engine_args(args)

        self.engine = self._run(start())
        self.max_context = int(self.engine.model_config.max_model_len)
        self._ids = itertools.count()

    def _run(self, coroutine: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def close(self) -> None:
        """Shut the engine down (its worker processes too)."""
        if self._thread.is_alive():
            engine, self.engine = self.engine, None
            engine.shutdown()
            del engine  # its __del__ shuts down again: let it run now, not at exit
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # generation -------------------------------------------------------------------------
    def _params(self, rule: StopRule, sampling: Sampling, limit: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=limit, temperature=sampling.temperature, top_p=sampling.top_p,
            seed=sampling.seed, logprobs=self.top_logprobs if rule.check is not None else 0,
            stop=list(rule.stop_strings), include_stop_str_in_output=True,
            stop_token_ids=sorted(self.eos_ids), skip_special_tokens=False,
            bad_words=list(rule.bad_words) or None, output_kind=RequestOutputKind.DELTA)

    def generate(
        self,
        prompt: Prompt,
        rule: StopRule,
        sampling: Sampling = Sampling(),
        on_text: TextCallback | None = None,
        cache_key: str | None = None,
    ) -> Generation:
        """Continue ``prompt`` (``cache_key`` is unused: the engine's prefix cache finds the
        shared prefix by itself)."""
        start_time = time.perf_counter()
        ids = self.render(prompt)
        limit = token_limit(len(ids), rule, self.max_context, self.model_id)
        state: dict[str, Any] = {"cached": None, "finish": None, "stop_reason": None}
        samples = self._samples(ids, self._params(rule, sampling, limit), state)
        try:
            decoded = follow(samples, rule, self.decode, self.eos_ids, limit, on_text)
        finally:
            samples.close()  # aborts the request if it is still running
        finish = decoded.finish_reason or engine_finish(state["finish"], state["stop_reason"])
        if finish is None:
            raise BackendError(f"vLLM ended the request for {self.model_id} with finish "
                               f"reason {state['finish']!r}")
        cached = state["cached"]
        return Generation(
            text=decoded.text, token_ids=decoded.token_ids, logprobs=decoded.logprobs,
            finish_reason=finish, prompt_tokens=len(ids),
            prefilled_tokens=len(ids) - int(cached or 0),
            seconds=time.perf_counter() - start_time, tokenizer=self.tokenizer_id,
            rejected=decoded.rejected, extra={"cached_tokens": cached},
        )

    def _samples(self, ids: list[int], params: Any, state: dict[str, Any]) -> Generator[Sample, None, None]:
        """The engine's sampled tokens as its request streams deltas."""
        from vllm.inputs import TokensPrompt

        request_id = f"relaygraph-{next(self._ids)}"
        outputs: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids),
                                                      params, request_id):
                    outputs.put(out)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, raised there
                outputs.put(exc)
            finally:
                outputs.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        finished = False
        try:
            while (out := self._next(outputs)) is not _DONE:
                if isinstance(out, BaseException):
                    raise BackendError(f"vLLM failed on a request for {self.model_id}: "
                                       f"{type(out).__name__}: {str(out)[:200]}")
                if state["cached"] is None:
                    state["cached"] = out.num_cached_tokens
                finished = out.finished
                completion = out.outputs[0]
                tops = completion.logprobs or []
                for i, token in enumerate(completion.token_ids):
                    top = tops[i] if i < len(tops) else None
                    logprob = top[token].logprob if top and token in top else float("nan")
                    yield Sample(int(token), float(logprob), _entropy_of(top))
                if completion.finish_reason is not None:
                    state["finish"] = completion.finish_reason
                    state["stop_reason"] = completion.stop_reason
        finally:
            if not finished:
                self._run(self.engine.abort(request_id), timeout=30)
                future.cancel()

    def _next(self, outputs: queue.Queue[Any]) -> Any:
        try:
            return outputs.get(timeout=self.timeout)
        except queue.Empty:
            raise BackendError(f"vLLM sent nothing for {self.timeout:.0f} s on a request for "
                               f"{self.model_id}; is the engine stuck?") from None

    def next_token_logprobs(self, prompt: Prompt, candidates: Sequence[str]) -> dict[str, float]:
        """Log-probability of each candidate's first token right after ``prompt``."""
        from vllm import SamplingParams

        first = {c: self.encode(c)[0] for c in candidates}
        wanted = sorted(set(first.values()))
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(wanted),
                                logprob_token_ids=wanted)
        from vllm.inputs import TokensPrompt

        async def once() -> Any:
            final = None
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=self.render(prompt)),
                                                  params, f"relaygraph-{next(self._ids)}"):
                final = out
            return final

        out = self._run(once(), timeout=self.timeout)
        top = out.outputs[0].logprobs[0]
        return {c: float(top[i].logprob) for c, i in first.items()}


def _entropy_of(top: dict[int, Any] | None) -> Any:
    if not top:
        return float("nan")
    return lambda: entropy_from_top(lp.logprob for lp in top.values())


class VLLMConfig(AgentConfig):
    """vLLM in this process (``pip install 'relaygraph[vllm]'``); ``engine_args`` go to
    vLLM's engine, ``tokenizer`` is where rendering loads the tokenizer from (default:
    ``model``)."""

    backend: Literal["vllm"] = "vllm"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    tokenizer: str | None = None
    engine_args: dict[str, Any] = {}
    trusted_fields: ClassVar[frozenset[str]] = frozenset({"tokenizer", "engine_args"})
    """``engine_args`` may name paths, download folders or ``trust_remote_code``."""

    def key(self) -> tuple[Any, ...]:
        return ("vllm", self.model, self.dtype, self.tokenizer,
                json.dumps(self.engine_args, sort_keys=True, default=str))

    def build(self) -> VLLMBackend:
        return VLLMBackend(self.model, tokenizer=self.tokenizer,
                           **{"dtype": self.dtype, **self.engine_args})

    def describe(self) -> str:
        return f"{self.model} (vllm, {self.dtype})"
