"""vLLM's scheduler-side objects, translated for the planner (:mod:`lmcache_connector.planner`).

The planner knows nothing of vLLM: it sees a :class:`~lmcache_connector.planner.PromptRequest` per
request and a list of :class:`~lmcache_connector.planner.ScheduledRequest` per step. This module is
the only place that reads vLLM's ``Request`` and ``SchedulerOutput`` for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmcache_connector.identity import lora_identity
from lmcache_connector.keys import MultimodalItem
from lmcache_connector.planner import PromptRequest, ScheduledRequest

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


def prompt_request(request: Request) -> PromptRequest:
    mm_items = tuple(
        MultimodalItem(f.identifier, f.mm_position.offset, f.mm_position.length) for f in (request.mm_features or ())
    )
    return PromptRequest(
        req_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        num_tokens=request.num_tokens,
        lora=lora_identity(request.lora_request),
        cache_salt=request.cache_salt,
        mm_items=mm_items,
        has_prompt_embeds=getattr(request, "prompt_embeds", None) is not None,
    )


def scheduled_requests(scheduler_output: SchedulerOutput) -> list[ScheduledRequest]:
    """Every request of the step, new and resumed ones first (their plan lists fills first anyway)."""
    scheduled = scheduler_output.num_scheduled_tokens
    out = [
        ScheduledRequest(
            req.req_id,
            list(req.block_ids[0]) if req.block_ids else [],
            replace_blocks=True,
            num_computed_tokens=req.num_computed_tokens,
            num_scheduled_tokens=scheduled.get(req.req_id, 0),
        )
        for req in scheduler_output.scheduled_new_reqs
    ]
    cached = scheduler_output.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        new_ids = cached.new_block_ids[i]
        out.append(
            ScheduledRequest(
                req_id,
                list(new_ids[0]) if new_ids else [],
                replace_blocks=req_id in cached.resumed_req_ids,
                num_computed_tokens=cached.num_computed_tokens[i],
                num_scheduled_tokens=scheduled.get(req_id, 0),
            )
        )
    return out
