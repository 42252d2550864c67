"""Two questions about one long document, asked of a Hugging Face ``transformers`` causal LM; the
second reuses the document's KV from lmcache_connector's cache (``lmcache_connector.engine``).

    python examples/transformers_doc_qa.py                      # a locally built random-weight Llama
    python examples/transformers_doc_qa.py --model PATH_OR_HUB_ID --document FILE
    LMCACHE_LOCAL_DISK=/tmp/kv LMCACHE_MAX_LOCAL_DISK_SIZE=5 python examples/transformers_doc_qa.py

The cache is configured by the same ``LMCACHE_*`` variables as the vLLM connector: with a disk
tier (or Redis), a second run finds the document already stored and the first question is fast too.
"""

import argparse
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmcache_connector.engine import KVCache

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="a transformers causal LM (default: build the bench-shaped Llama locally)")
parser.add_argument("--document", help="a text file (default: 3,000 words of the local model's vocabulary)")
parser.add_argument("--answer-tokens", type=int, default=16)
args = parser.parse_args()

questions = [" Question: what is the document about? Answer:", " Question: who wrote it? Answer:"]
if args.model is None:
    from lmcache_connector.testing.tiny_model import BENCH, build_model

    args.model = str(build_model(BENCH, Path(".cache/models")))
    questions = [" w11 w12 w13 w14 w15 w16", " w21 w22 w23 w24 w25 w26"]  # its vocabulary: the words w4..w3999
model = AutoModelForCausalLM.from_pretrained(args.model).eval()
tokenizer = AutoTokenizer.from_pretrained(args.model)
rng = random.Random(0)
document = (
    Path(args.document).read_text() if args.document else " ".join(f"w{rng.randrange(4, 4000)}" for _ in range(3000))
)
doc_ids = tokenizer(document).input_ids


def ask(cache: KVCache, question: str) -> None:
    ids = doc_ids + tokenizer(question, add_special_tokens=False).input_ids
    start = time.perf_counter()
    hit = cache.retrieve(ids[:-1], as_cache=True)  # leave a token to compute: its logits start the answer
    reused, past = hit if hit is not None else (0, None)
    with torch.no_grad():
        out = model(torch.tensor([ids[reused:]]), past_key_values=past, use_cache=True)
        seconds = time.perf_counter() - start
        cache.store(ids, out.past_key_values)  # stores the chunks not stored yet (the document's, once)
        answer = [int(out.logits[0, -1].argmax())]
        for _ in range(args.answer_tokens - 1):  # greedy decoding on the same cache
            out = model(torch.tensor([answer[-1:]]), past_key_values=out.past_key_values, use_cache=True)
            answer.append(int(out.logits[0, -1].argmax()))
    print(f"{question!r}: first token after {seconds:.3f} s, {reused} of {len(ids)} prompt tokens from the cache")
    print(f"  answer: {tokenizer.decode(answer)!r}")


with KVCache.for_model(model) as cache:
    for question in questions:
        ask(cache, question)
