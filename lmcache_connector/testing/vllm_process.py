"""A real vLLM engine in a child process, driven over a pipe: for tests, benchmarks and the demo.

Each :class:`EngineProcess` owns one ``vllm.LLM`` (engine core in the child's own process:
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor), so several engines with different settings
can run in one pytest session without sharing vLLM's process-global state, and an engine can be
stopped and started again (a restart) like a real server. Besides ``generate``, the child answers
questions about the connector inside it (index, pool, pins) and can inject faults, which is how the
tests check what a user cannot see directly.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from typing import Any

CPU_ENGINE_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "2",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

CONNECTOR = {"kv_connector": "LMCacheConnector", "kv_connector_module_path": "lmcache_connector", "kv_role": "kv_both"}


class EngineError(RuntimeError):
    pass


class EngineProcess:
    """Start with ``EngineProcess(llm_kwargs, env)``; call methods; ``close()`` (or use ``with``)."""

    def __init__(
        self,
        llm_kwargs: dict[str, Any],
        env: dict[str, str] | None = None,
        start_timeout: float = 300,
        file_size_limit: int | None = None,
        cpus: set[int] | None = None,
    ):
        """``file_size_limit`` caps the size of any file the engine writes (RLIMIT_FSIZE): a real
        kernel-enforced write failure, as a full disk gives. ``cpus`` binds the engine to those
        cores (and as many OpenMP threads), so engines running side by side do not fight over one."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        child_env = {**CPU_ENGINE_ENV, **(env or {})}
        if cpus:
            child_env["OMP_NUM_THREADS"] = str(len(cpus))
        args = (child_conn, llm_kwargs, child_env, file_size_limit, sorted(cpus) if cpus else None)
        self._proc = ctx.Process(target=_serve, args=args)
        self._proc.start()
        child_conn.close()
        self.start_seconds = self._receive(start_timeout)["start_seconds"]

    def call(self, command: str, timeout: float = 600, **kwargs: Any) -> Any:
        if not self._proc.is_alive():
            raise EngineError(f"engine process exited (code {self._proc.exitcode})")
        self._conn.send((command, kwargs))
        return self._receive(timeout)

    def _receive(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.2):
            if not self._proc.is_alive():
                raise EngineError(f"engine process exited (code {self._proc.exitcode})")
            if time.monotonic() > deadline:
                self.kill()
                raise EngineError(f"engine did not answer within {timeout:.0f} s")
        ok, value = self._conn.recv()
        if not ok:
            raise EngineError(value)
        return value

    def send(self, command: str, **kwargs: Any) -> None:
        """Start a command without waiting for its answer (e.g. to kill the engine in the middle of it)."""
        self._conn.send((command, kwargs))

    def generate(self, prompts: list[list[int]], max_tokens: int = 8, logprobs: int | None = None) -> list[dict]:
        return self.call("generate", prompts=prompts, max_tokens=max_tokens, logprobs=logprobs)

    def close(self, timeout: float = 60) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("shutdown", {}))
                self._proc.join(timeout)
            except (BrokenPipeError, OSError):
                pass
        self.kill()

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- the child


def _serve(
    conn,
    llm_kwargs: dict[str, Any],
    env: dict[str, str],
    file_size_limit: int | None = None,
    cpus: list[int] | None = None,
) -> None:
    os.environ.update(env)
    if cpus:
        os.sched_setaffinity(0, cpus)
    if file_size_limit is not None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    try:
        started = time.monotonic()
        llm = _make_llm(llm_kwargs)
        conn.send((True, {"start_seconds": time.monotonic() - started}))
    except Exception:
        conn.send((False, traceback.format_exc()))
        return
    handlers = _Handlers(llm)
    while True:
        try:
            command, kwargs = conn.recv()
        except EOFError:
            return
        if command == "shutdown":
            handlers.shutdown()
            conn.send((True, None))
            return
        try:
            conn.send((True, getattr(handlers, command)(**kwargs)))
        except Exception:
            conn.send((False, traceback.format_exc()))


def _make_llm(llm_kwargs: dict[str, Any]):
    from vllm import LLM
    from vllm.config import KVEventsConfig, KVTransferConfig

    kwargs = dict(llm_kwargs)
    if isinstance(kwargs.get("kv_transfer_config"), dict):
        kwargs["kv_transfer_config"] = KVTransferConfig(**kwargs["kv_transfer_config"])
    if isinstance(kwargs.get("kv_events_config"), dict):  # --kv-events-config
        kwargs["kv_events_config"] = KVEventsConfig(**kwargs["kv_events_config"])
    kwargs.setdefault("distributed_executor_backend", "uni")
    kwargs.setdefault("enforce_eager", True)
    return LLM(**kwargs)


class _Handlers:
    def __init__(self, llm):
        self.llm = llm

    def generate(self, prompts: list[list[int]], max_tokens: int, logprobs: int | None) -> list[dict]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs, ignore_eos=True)
        started = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        results = []
        for out in outputs:
            completion = out.outputs[0]
            top = None
            if completion.logprobs is not None:
                top = [{tok: lp.logprob for tok, lp in pos.items()} for pos in completion.logprobs]
            results.append(
                {
                    "token_ids": list(completion.token_ids),
                    "num_cached_tokens": out.num_cached_tokens or 0,
                    "finish_reason": completion.finish_reason,
                    "logprobs": top,
                    "seconds": elapsed,
                }
            )
        return results

    def ttft(self, prompt: list[int]) -> float:
        """Wall time of one ``generate`` with ``max_tokens=1``: the time to the first token."""
        from vllm import SamplingParams

        started = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        return time.perf_counter() - started

    def decode_timeline(
        self, prompts: list[list[int]], max_tokens: int, late_prompt: list[int] | None = None, late_after_steps: int = 0
    ) -> dict[str, Any]:
        """Step the engine by hand to time each token: ``prompts`` decode ``max_tokens`` tokens each
        (greedy, ``ignore_eos``); once ``late_after_steps`` steps have run, ``late_prompt`` (if any)
        is added for one token. Returns ``tokens`` (per prompt, the ``perf_counter`` time at which
        each token's step returned), ``late_added`` and ``late_first_token`` (same clock, or None).
        ``generate`` cannot do this: it returns only when every request is done."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            raise RuntimeError("decode_timeline needs an idle engine")
        self._timelines = getattr(self, "_timelines", 0) + 1
        run = f"timeline{self._timelines}"
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        ids = [f"{run}-{i}" for i in range(len(prompts))]
        tokens: dict[str, list[float]] = {req_id: [] for req_id in ids}
        for req_id, prompt in zip(ids, prompts, strict=True):
            # vLLM may report the internal id it returns (the given one plus a random suffix)
            tokens[engine.add_request(req_id, {"prompt_token_ids": prompt}, params)] = tokens[req_id]
        late_ids, late_added, late_first = {f"{run}-late"}, None, None
        steps = 0
        while engine.has_unfinished_requests():
            if late_prompt is not None and late_added is None and steps >= late_after_steps:
                one = SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.DELTA)
                late_added = time.perf_counter()
                late_ids.add(engine.add_request(f"{run}-late", {"prompt_token_ids": late_prompt}, one))
            outputs = engine.step()
            now = time.perf_counter()
            steps += 1
            for out in outputs:
                new = len(out.outputs[0].token_ids) if out.outputs else 0
                if out.request_id in late_ids:
                    if new and late_first is None:
                        late_first = now
                elif out.request_id in tokens:
                    tokens[out.request_id].extend([now] * new)
        return {"tokens": [tokens[req_id] for req_id in ids], "late_added": late_added, "late_first_token": late_first}

    def _scheduler_connector(self):
        return self.llm.llm_engine.engine_core.engine_core.scheduler.connector

    def _worker_connector(self):
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        return get_kv_transfer_group()

    def connector_state(self, settle: bool = True) -> dict[str, Any]:
        """The connector's bookkeeping. With ``settle``, background writes finish first and one
        tiny request (shorter than a block: it stores nothing) lets the workers report them, as the
        next real request would."""
        import resource

        from vllm import SamplingParams

        scheduler = self._scheduler_connector()
        worker = self._worker_connector()
        if settle:
            worker.executor.flush_writes(30)  # every tier's background writes (disk, remote, ...)
            self.llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=1), use_tqdm=False)
        state = scheduler.state()
        worker_state = worker.state()
        state.update(
            slot_bytes=worker_state["slot_bytes"],
            pool_bytes=worker_state["pool_bytes"],
            worker_disabled=worker_state["disabled"],
            worker_totals=worker_state["totals"],
            max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
        return state

    def fingerprints(self, prompt: list[int]) -> dict[str, Any]:
        from lmcache_connector.keys import block_fingerprints, request_root

        sched = self._scheduler_connector().planner
        fps = block_fingerprints(request_root(sched.namespace_digest), prompt, sched.geometry.block_size)
        return {"namespace": sched.namespace_digest.hex(), "fingerprints": [fp.hex() for fp in fps]}

    def time_connector(self) -> None:
        """Start accumulating the wall time spent inside the connector's hooks (both halves)."""
        self._hook_seconds = {"total": 0.0}
        names = [
            "get_num_new_matched_tokens",
            "update_state_after_alloc",
            "build_connector_meta",
            "update_connector_output",
            "request_finished",
            "start_load_kv",
            "wait_for_save",
            "build_connector_worker_meta",
            "get_block_ids_with_load_errors",
        ]
        for connector in {id(c): c for c in (self._scheduler_connector(), self._worker_connector())}.values():
            for name in names:
                setattr(connector, name, self._timed(getattr(connector, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._hook_seconds["total"] += time.perf_counter() - started

        return timed

    def connector_seconds(self) -> float:
        return self._hook_seconds["total"]

    def fail_next_loads(self, count: int) -> None:
        """Make the worker's next ``count`` chunk loads raise, as a broken tier would."""
        worker = self._worker_connector().executor
        original = worker.mover.load
        remaining = [count]

        def failing_load(src, block_ids, slot=None):
            if remaining[0] > 0:
                remaining[0] -= 1
                raise OSError("injected load failure")
            return original(src, block_ids, slot=slot)

        worker.mover.load = failing_load

    def corrupt_pool(self, seed: int = 0) -> None:
        """Overwrite every stored chunk's bytes with noise (a negative control: outputs must change)."""
        import torch

        worker = self._worker_connector().executor
        index = self._scheduler_connector().planner.index
        gen = torch.Generator().manual_seed(seed)
        for slot in {entry.slot for entry in index.entries()}:
            view = worker.pool.slot(slot)
            view.copy_(torch.randint(0, 256, view.shape, dtype=torch.uint8, generator=gen))

    def keep_warnings(self) -> None:
        """Start keeping the connector's warning lines, from both halves (``warnings`` returns them)."""
        import logging

        if getattr(self, "_warnings", None) is None:
            self._warnings: list[str] = []
            kept = self._warnings

            class Keep(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    kept.append(record.getMessage())

            logging.getLogger("lmcache_connector").addHandler(Keep(logging.WARNING))

    def warnings(self) -> list[str]:
        """The connector's warning lines since ``keep_warnings``."""
        return list(self._warnings)

    def reset_prefix_cache(self, reset_connector: bool = False) -> bool:
        """Empty vLLM's own prefix cache (and the connector's too, when asked)."""
        return bool(self.llm.reset_prefix_cache(reset_connector=reset_connector))

    def shutdown(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
