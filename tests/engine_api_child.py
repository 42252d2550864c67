"""A process of its own that uses the engine API on a float32 tiny Llama (``test_engine_api_processes.py``).

    python engine_api_child.py store    MODEL PROMPT_JSON   # store the prompt's past_key_values, close
    python engine_api_child.py continue MODEL PROMPT_JSON   # retrieve them, continue, compare with recomputing

The configuration comes from the ``LMCACHE_*`` environment, as for the connector. The result is
one JSON object on the last line of stdout.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import LlamaForCausalLM

from lmcache_connector.engine import KVCache

torch.set_num_threads(1)
NEW_TOKENS = 8


def store(model, prompt: list[int]) -> dict:
    with torch.no_grad():
        kv = model(torch.tensor([prompt]), use_cache=True).past_key_values
    with KVCache.for_model(model) as cache:
        return {"stored": cache.store(prompt, kv)}


def greedy(model, prompt: list[int], cache=None) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def continue_from_cache(model, prompt: list[int], longer: list[int], shared: int) -> dict:
    with torch.no_grad():
        recomputed = model(torch.tensor([prompt]), use_cache=True)
        recomputed_longer = model(torch.tensor([longer]), use_cache=True).past_key_values
    with KVCache.for_model(model) as cache:
        available = cache.lookup(prompt)
        # The model needs at least one token to compute logits: the prefix comes from prompt[:-1].
        hit, kv = cache.retrieve(prompt[:-1], as_cache=True)
        with torch.no_grad():
            logits = model(torch.tensor([prompt[hit:]]), past_key_values=kv, use_cache=True).logits
        _, kv = cache.retrieve(prompt[:-1], as_cache=True)
        tokens_from_cache = greedy(model, prompt, kv)
        longer_hit, longer_kv = cache.retrieve(longer)
        miss = cache.retrieve([t + 1 for t in prompt])
        totals = cache.state()["planner"]["totals"]
    want = recomputed_longer.layers
    return {
        "available": available,
        "hit": hit,
        "logits_max_diff": (logits[0, -1] - recomputed.logits[0, -1]).abs().max().item(),
        "tokens_from_cache": tokens_from_cache,
        "tokens_recomputed": greedy(model, prompt),
        "longer_hit": longer_hit,
        "longer_kv_max_diff": max(
            (got - layer_kv[:, :, :shared]).abs().max().item()
            for (k, v), layer in zip(longer_kv, want, strict=True)
            for got, layer_kv in ((k, layer.keys), (v, layer.values))
        ),
        "miss": miss is None,
        "hit_tokens_by_tier": totals["hit_tokens_by_tier"],
    }


def main() -> None:
    role, folder, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    if role == "store":
        result = store(model, prompt["prompt"])
    else:
        result = continue_from_cache(model, prompt["prompt"], prompt["longer"], prompt["shared"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
