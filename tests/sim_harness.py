"""A deterministic simulation of vLLM serving with the connector: vLLM's real scheduler, the
connector's real SCHEDULER and WORKER halves, and a simulated model instead of a forward pass.

* :class:`Sim` builds a real ``VllmConfig`` on CPU (a local folder with a tiny Llama
  ``config.json``, no model hub), vLLM's real ``Scheduler`` with a small one-group KV cache (so
  requests get preempted), one WORKER-role connector per tensor-parallel rank with its own KV
  tensors (``[B, H, N, C]`` views of one flat buffer, as vLLM allocates them), and steps them the
  way vLLM's model runner and executor do: ``handle_preemptions``, ``bind_connector_metadata``,
  ``start_load_kv`` (before the forward when the step has synchronous loads, after it otherwise),
  the forward, ``wait_for_save``, ``get_transfer_results``, ``get_block_ids_with_load_errors``,
  ``get_kv_connector_stats``, ``build_connector_worker_meta``, ``clear_connector_metadata``; the
  ranks' outputs are merged by vLLM's own ``KVOutputAggregator`` and fed to ``update_from_output``.
* The simulated model (:mod:`sim_model`) checks THE INVARIANT on every forward: every position a
  scheduled request attends to holds its own expected KV, unless the step reported one of that
  request's blocks as a load error (vLLM then discards the step's output and recomputes). Sampled
  tokens are a function of the KV read, and every token that reaches a request's output is checked.
  A violation raises :class:`InvariantViolation` naming the step, request, block, position, what the
  position holds and who last wrote the block.
* Runs are deterministic: background disk writes start after the step that queued them and are
  awaited before the next one, and the disk tier's recency follows a simulated clock. Every write
  is checked to read its slot unchanged since it was queued.
* Building the engine lives in :mod:`sim_setup`, fault injection in :mod:`sim_faults`, and every
  read of the connector's private state in :mod:`sim_internals`.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any

import torch
from sim_faults import Faults, install_hooks
from sim_internals import (
    connector_state,
    settle_background_fills,
    settle_disk,
    settle_remote,
    synchronous_disk_recency,
)
from sim_model import KVModel, RankKV, Scheduled, Trace, embedding_input, forward, token_from_digest, token_inputs
from sim_setup import SimConfig, build_configs, build_scheduler, build_worker, clear_lmcache_env

__all__ = ["InvariantViolation", "Sim", "SimConfig", "SimFactory", "clear_lmcache_env"]

HISTORY = 10  # events per request quoted in a violation message


class InvariantViolation(AssertionError):
    """Wrong KV reached attention, a wrong token reached an output, or a slot changed under a reader."""


class Sim:
    def __init__(self, cfg: SimConfig, root: Path, disk_dir: Path | None = None):
        from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator

        self.cfg = cfg
        self.root = Path(root)
        self.disk_dir = Path(disk_dir) if disk_dir is not None else self.root / "disk"
        self.vllm_config, self.kv_cache_config = build_configs(cfg, self.root, self.disk_dir)
        self.scheduler, self.block_hasher = build_scheduler(self.vllm_config, self.kv_cache_config, cfg.block_size)
        self.connector = self.scheduler.connector
        self.aggregator = KVOutputAggregator.from_connector(self.connector, cfg.tp)
        self.model = KVModel(cfg.num_layers, cfg.token_bytes, cfg.tp)
        self.faults = Faults(self)
        self.step_no = 0
        self.workers = []
        self.ranks: list[RankKV] = []
        for rank in range(cfg.tp):
            worker, storage = build_worker(self.vllm_config, self.kv_cache_config, rank, cfg.tp)
            self.workers.append(worker)
            self.ranks.append(RankKV(rank, storage, self.model, cfg.block_size))
            install_hooks(self, rank, worker)
        self.traces: dict[str, Trace] = {}
        self.requests: dict[str, Any] = {}  # live vllm Request objects
        self.finished: dict[str, str] = {}  # request id -> final status name
        self.external_tokens: dict[str, list[int]] = {}  # request id -> num_external_tokens vLLM allocated for
        self.async_asked: set[str] = set()  # the connector's last answer for them was asynchronous
        self.async_waiting: set[str] = set()  # requests parked for a background load
        self.async_loaded: set[str] = set()  # requests admitted again after a background load
        self.tables: dict[str, list[int]] = {}  # the workers' block tables, as a model runner keeps them
        self.async_violations: list[str] = []  # found by background threads, raised at the next step
        self.load_errors: Counter = Counter()  # request id -> steps that reported one of its blocks
        self.excused: list[str] = []  # wrong reads vLLM was told to recompute
        self.reported_at: dict[int, int] = {}  # block id -> last step that reported it as a load error
        self.history: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=HISTORY))  # per request
        self._next_id = 0
        self._closed = False
        self.step_seconds = 0.0  # time spent in step(): the simulation's throughput
        self.kv_events: list[Any] = []  # with cfg.kv_events: every event vLLM published, GPU and connector
        if cfg.kv_events:
            self.scheduler.kv_event_publisher.publish = lambda batch: self.kv_events.extend(batch.events)
        self._watch_connector()
        synchronous_disk_recency(self.connector, self.faults.clock.touch)

    def _watch_connector(self) -> None:
        """Record how many external tokens vLLM allocated for each request (the connector's hits)."""
        original = self.connector.update_state_after_alloc

        lookup = self.connector.get_num_new_matched_tokens

        def get_num_new_matched_tokens(request, num_computed_tokens):
            tokens, load_async = lookup(request, num_computed_tokens)
            if load_async:
                self.async_asked.add(request.request_id)
            return tokens, load_async

        def update_state_after_alloc(request, blocks, num_external_tokens):
            req_id = request.request_id
            if req_id in self.async_waiting:  # admitted again, its background load done
                self.async_waiting.discard(req_id)
                self.async_loaded.add(req_id)
            elif req_id in self.async_asked and num_external_tokens:
                self.async_asked.discard(req_id)
                self.async_waiting.add(req_id)
            self.external_tokens.setdefault(req_id, []).append(num_external_tokens)
            self._event(request.request_id, f"admitted, {num_external_tokens} tokens promised by the connector")
            return original(request, blocks, num_external_tokens)

        self.connector.update_state_after_alloc = update_state_after_alloc
        self.connector.get_num_new_matched_tokens = get_num_new_matched_tokens

    # ------------------------------------------------------------ requests

    def add_request(
        self,
        tokens: list[int],
        max_tokens: int = 4,
        req_id: str | None = None,
        embeds: torch.Tensor | None = None,
        is_token: list[bool] | None = None,
    ) -> str:
        """Queue a request; with ``embeds`` (``[len(tokens), hidden]``), positions where ``is_token``
        is False take their input from the embedding row (mixed-mode prompt embeddings)."""
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        if req_id is None:
            req_id = f"r{self._next_id}"
            self._next_id += 1
        inputs = token_inputs(tokens)
        if embeds is not None:
            mask = is_token if is_token is not None else [False] * len(tokens)
            inputs = [
                ident if tok else embedding_input(embeds[i].numpy().tobytes())
                for i, (ident, tok) in enumerate(zip(inputs, mask, strict=True))
            ]
        trace = Trace(req_id, inputs, prompt_len=len(tokens))
        self.traces[req_id] = trace
        self.model.remember(trace)
        request = Request(
            req_id,
            list(tokens),
            SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            None,
            prompt_embeds=embeds,
            prompt_is_token_ids=is_token if embeds is not None else None,
            block_hasher=self.block_hasher,
        )
        self.requests[req_id] = request
        self.scheduler.add_request(request)
        return req_id

    def abort(self, req_id: str) -> None:
        from vllm.v1.request import RequestStatus

        self.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)
        self._collect_finished()

    # ------------------------------------------------------------ one engine step

    def step(self) -> None:
        from vllm.forward_context import ForwardContext
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        started = time.perf_counter()
        self._settle_disk_writers()
        self.step_no += 1
        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        batch = self._batch(out)
        context = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={})
        for worker in self.workers:
            worker.handle_preemptions(meta)
            worker.bind_connector_metadata(meta)
            if out.has_sync_kv_loads:
                worker.start_load_kv(context)
        status = forward(self.ranks, batch, self.step_no) if batch else {}
        outputs = []
        for rank, worker in enumerate(self.workers):
            if not out.has_sync_kv_loads:
                worker.start_load_kv(context)
            worker.wait_for_save()
            settle_background_fills(worker)  # background fills end within the step: runs stay deterministic
            results = worker.get_transfer_results(out.finished_req_ids)
            kv_out = KVConnectorOutput(
                finished_sending=results.finished_sending or None,
                finished_recving=results.finished_recving or None,
                failed_recving=results.failed_recving,
                invalid_block_ids=worker.get_block_ids_with_load_errors(),
                kv_connector_stats=worker.get_kv_connector_stats(),
                kv_cache_events=worker.get_kv_connector_kv_cache_events(),
                kv_connector_worker_meta=worker.build_connector_worker_meta(),
            )
            worker.clear_connector_metadata()
            self.faults.submit_deferred_writes(rank)
            outputs.append(self._runner_output(out, batch, status, kv_out, ModelRunnerOutput))
        merged = outputs[0] if len(outputs) == 1 else self.aggregator.aggregate(outputs)
        kv_merged = merged.kv_connector_output
        invalid = set(kv_merged.invalid_block_ids) if kv_merged is not None else set()
        self._resolve(batch, status, invalid)
        self.scheduler.update_from_output(out, merged)
        self._sync_outputs()
        self._collect_finished()
        self._settle_disk_writers()
        self.step_seconds += time.perf_counter() - started

    def _settle_disk_writers(self) -> None:
        """Between steps the secondary tiers are quiet: every queued write is done (what faults do
        to files then, and what the next step reads, is the same on every run)."""
        for rank, worker in enumerate(self.workers):
            if rank not in self.faults.write_gates:  # a writer held on purpose stays behind
                settle_disk(worker)
                settle_remote(worker)
        self._raise_async_violations()

    def _event(self, req_id: str, what: str) -> None:
        self.history[req_id].append(f"step {self.step_no}: {what}")

    def _batch(self, out) -> list[Scheduled]:
        """Mirror the model runner's block tables and list what this step computes."""
        for req_id in out.preempted_req_ids or ():
            self._event(req_id, "preempted")
        for req_id in list(out.finished_req_ids) + list(out.preempted_req_ids or ()):
            self.tables.pop(req_id, None)
        starts = {}
        for new in out.scheduled_new_reqs:
            self.tables[new.req_id] = list(new.block_ids[0])
            starts[new.req_id] = new.num_computed_tokens
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self.tables[req_id] = list(new_ids[0]) if new_ids else []
            elif new_ids:
                self.tables.setdefault(req_id, []).extend(new_ids[0])
            starts[req_id] = cached.num_computed_tokens[i]
        batch = []
        for req_id, num in out.num_scheduled_tokens.items():
            table = self.tables[req_id]
            actual = list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])
            if actual[: len(table)] != table:
                raise AssertionError(f"harness bug: block table of {req_id} {table} != scheduler's {actual}")
            batch.append(Scheduled(self.traces[req_id], table, starts[req_id], num))
            sync = " (sync load this step)" if out.has_sync_kv_loads else ""
            self._event(req_id, f"computes [{starts[req_id]}, {starts[req_id] + num}) on blocks {table}{sync}")
        return batch

    def _runner_output(self, out, batch, status, kv_out, model_runner_output_cls):
        if not batch:
            return model_runner_output_cls(
                req_ids=[], req_id_to_index={}, kv_connector_output=None if kv_out.is_empty() else kv_out
            )
        req_ids = [item.trace.req_id for item in batch]
        sampled = []
        for item in batch:
            end = item.start + item.num
            if end < len(item.trace) or end < item.trace.prompt_len:
                sampled.append([])  # a partial prefill samples nothing
                continue
            wrong = status.get(item.trace.req_id)
            # A token sampled after attention over wrong KV is wrong too (the poisoned KV's "token").
            digest = (
                item.trace.digests[-1]
                if wrong is None
                else self.model.poison(item.trace, end - 1, end, wrong.read_summary, self.step_no)[0]
            )
            sampled.append([token_from_digest(digest)])
        return model_runner_output_cls(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            kv_connector_output=kv_out,
        )

    def _resolve(self, batch: list[Scheduled], status, invalid: set[int]) -> None:
        """Wrong KV read by a request is excused only if the step reported one of its blocks."""
        bs = self.cfg.block_size
        self.reported_at.update((b, self.step_no) for b in invalid)
        for item in batch:
            attended = set(item.block_ids[: -(-item.start // bs)])
            reported = bool(attended & invalid)
            self.load_errors[item.trace.req_id] += reported
            if reported:
                self._event(item.trace.req_id, f"load errors on its blocks {sorted(attended & invalid)}")
            wrong = status.get(item.trace.req_id)
            if wrong is None:
                continue
            if reported:
                self.excused.append(f"step {self.step_no}: {item.trace.req_id} read {wrong.found} at {wrong.position}")
                self._event(item.trace.req_id, f"read wrong KV at position {wrong.position} (excused)")
                continue
            reported = self.reported_at.get(wrong.block, -1)
            reported = reported if reported >= wrong.written_at else None
            raise InvariantViolation(
                f"step {self.step_no}: request {item.trace.req_id} (computing positions "
                f"{item.start}..{item.start + item.num - 1}) attends to position {wrong.position} "
                f"(block {wrong.block}, offset {wrong.position % bs}) on rank {wrong.rank}, layer {wrong.layer}, "
                f"which holds {wrong.found}; block {wrong.block} was last written by {wrong.last_writer}"
                + (f" and reported as a failed load at step {reported}" if reported else "")
                + f"; load errors reported this step: {sorted(invalid) or 'none'}. "
                + f"History of {item.trace.req_id}: "
                + "; ".join(self.history[item.trace.req_id])
            )

    def _sync_outputs(self) -> None:
        for req_id, request in self.requests.items():
            trace = self.traces[req_id]
            outputs = request.output_token_ids
            while len(trace) < trace.prompt_len + len(outputs):
                i = len(trace) - trace.prompt_len
                want = trace.next_token()
                if outputs[i] != want:
                    raise InvariantViolation(
                        f"step {self.step_no}: request {req_id} output token {i} is {outputs[i]}, expected {want}: "
                        "a token sampled from wrong KV reached the output"
                    )
                start = len(trace.digests)
                trace.append_token(outputs[i])
                self.model.remember(trace, start)

    def _collect_finished(self) -> None:
        for req_id, request in list(self.requests.items()):
            if request.is_finished():
                self.finished[req_id] = request.status.name
                del self.requests[req_id]

    def _raise_async_violations(self) -> None:
        if self.async_violations:
            raise InvariantViolation("; ".join(self.async_violations))

    # ------------------------------------------------------------ runs and end checks

    def serve(self, tokens: list[int], max_tokens: int = 2) -> str:
        """One request, run until vLLM has none left; its id."""
        req_id = self.add_request(list(tokens), max_tokens=max_tokens)
        self.run()
        return req_id

    def run(self, max_steps: int = 10_000) -> int:
        """Step until vLLM has no request left; returns the number of steps."""
        steps = 0
        while self.scheduler.has_requests():
            if steps >= max_steps:
                raise AssertionError(f"requests still unfinished after {max_steps} steps: {sorted(self.requests)}")
            self.step()
            steps += 1
        return steps

    def settle(self, max_requests: int = 5) -> dict[str, Any]:
        """Let the workers report background work, as the next real request would (one shorter
        than a block: it stores nothing), and return the connector's state."""
        for _ in range(max_requests):
            state = connector_state(self.connector)
            if not state["inflight"]:
                return state
            self.add_request([5, 6, 7], max_tokens=1)
            self.run()
        return connector_state(self.connector)

    def assert_clean(self) -> dict[str, Any]:
        """Every request finished, vLLM's scheduler empty, no pin or transfer left, accounting exact."""
        state = self.settle()
        assert not self.requests, f"unfinished requests: {sorted(self.requests)}"
        assert not self.scheduler.requests, f"vLLM still tracks {sorted(self.scheduler.requests)}"
        pool = self.scheduler.kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == self.kv_cache_config.num_blocks - 1, "vLLM KV blocks leaked"
        summary = {k: state.get(k) for k in ("pins", "inflight", "tracked_requests")}
        assert summary == {"pins": 0, "inflight": 0, "tracked_requests": 0}, f"connector leaked: {state}"
        assert state["used_slots"] == state["entries"], f"slots in use != chunks stored: {state}"
        if "entry_bytes" in state:
            assert state["stored_bytes"] == state["entry_bytes"], f"stored bytes drifted: {state}"
        return state

    def errors(self) -> dict[str, str]:
        return {r: s for r, s in self.finished.items() if s == "FINISHED_ERROR"}

    def replay(self, prompts: list[list[int]], max_tokens: int = 2) -> list[str]:
        """Run each prompt again, alone, after emptying vLLM's own prefix cache: every chunk the
        connector still holds is loaded into a fresh request and read under the invariant."""
        ids = []
        for tokens in prompts:
            assert self.scheduler.reset_prefix_cache(), "vLLM's prefix cache could not be reset"
            ids.append(self.add_request(list(tokens), max_tokens=max_tokens))
            self.run()
        return ids

    def hit_tokens(self, req_id: str) -> int:
        """External tokens vLLM allocated for the request's (last) admission. A request whose load
        ran in the background is admitted twice: for the load, then with it done (0 more tokens)."""
        admissions = self.external_tokens.get(req_id) or [0]
        if len(admissions) >= 2 and admissions[-1] == 0 and req_id in self.async_loaded:
            return admissions[-2]
        return admissions[-1]

    def preempt_running(self) -> bool:
        """vLLM preempts every running request, as on ``reset_prefix_cache(reset_running_requests=True)``
        (a weight update); they resume, recomputing or reloading their KV, when scheduled again.
        vLLM refuses (raises) while a request waits for a background load: then nothing happens."""
        if self.async_waiting:
            return False
        self.scheduler.reset_prefix_cache(reset_running_requests=True)
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for rank in list(self.faults.write_gates):
            self.faults.release_disk_writes(rank)
        for worker in self.workers:
            worker.shutdown()
        self.connector.shutdown()


class SimFactory:
    """Builds Sims under one folder (each its own, unless a disk folder is shared) and closes them."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.sims: list[Sim] = []

    def __call__(self, disk_dir: Path | None = None, **settings: Any) -> Sim:
        sim = Sim(SimConfig(**settings), self.root / f"sim{len(self.sims)}", disk_dir=disk_dir)
        self.sims.append(sim)
        return sim

    def restart(self, sim: Sim) -> Sim:
        """Close ``sim`` and start a new engine with its configuration on its disk folder."""
        sim.close()
        return self(disk_dir=sim.disk_dir, **dataclasses.asdict(sim.cfg))

    def close(self) -> None:
        for sim in self.sims:
            sim.close()
