"""Build small random-weight Llama models locally, so vLLM can run without a model hub.

Each model is a ``LlamaForCausalLM`` with seeded random weights plus a word-level tokenizer over a
synthetic vocabulary (``w0 w1 ...``), saved with ``save_pretrained`` into a folder named after its
shape. Building one takes seconds and happens once per folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    vocab_size: int = 1000
    torch_dtype: str = "bfloat16"
    max_position_embeddings: int = 8192
    seed: int = 0

    @property
    def name(self) -> str:
        return (
            f"llama-h{self.hidden_size}-l{self.num_hidden_layers}-a{self.num_attention_heads}"
            f"-kv{self.num_key_value_heads}-d{self.head_dim}-v{self.vocab_size}-{self.torch_dtype}-s{self.seed}"
        )


# The models the project's tests, demo and benchmarks use.
TINY = ModelShape()
SMALL_MHA = ModelShape(
    hidden_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=512,
    vocab_size=2000,
    seed=1,
)
BENCH = ModelShape(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=2048,
    vocab_size=4000,
    seed=2,
)


def build_model(shape: ModelShape, root: str | Path) -> Path:
    """Create (once) and return the folder of a model with this shape under ``root``."""
    folder = Path(root) / shape.name
    marker = folder / "lmcache_model.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(shape):
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        # Larger weights than the usual 0.02 make the next-token distribution peaked, so greedy
        # decoding has fewer exact ties between tokens.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype=shape.torch_dtype,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, shape.torch_dtype))
    model.save_pretrained(folder, safe_serialization=True)
    _build_tokenizer(shape.vocab_size).save_pretrained(folder)
    marker.write_text(json.dumps(asdict(shape)))
    return folder


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def random_prompt(length: int, seed: int, vocab_size: int = 1000) -> list[int]:
    """A reproducible prompt of token ids that avoids the special tokens (0-3)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(4, vocab_size) for _ in range(length)]
