"""Token generation: chunked prefill, then sample / decode until EOS, a stop string or the limit.

`generate` yields text pieces as soon as they are complete UTF-8 (a token may end inside a
multi-byte character) and never yields text that could still turn into a stop string.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .errors import DsvError
from .kv_cache import KVCache
from .model import Model
from .sampler import SamplingParams, sample
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0               # forward passes after the prompt
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float = 0.0          # from start to the first generated token
    stop_reason: str = ""               # "eos" | "stop" | "length" | "context"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens, {self.prefill_tps:.2f} tok/s | "
                f"generation: {self.generated_tokens} tokens, {self.decode_tps:.2f} tok/s "
                f"({self.decode_steps} decode steps) | "
                f"first token after {self.first_token_s:.2f} s | stop: {self.stop_reason}")


@dataclass
class GenerationConfig:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()      # besides EOS
    prefill_chunk: int = 512

    def __post_init__(self):
        if self.max_tokens < 0:
            raise DsvError(f"--max-tokens must be >= 0, got {self.max_tokens}")
        if self.prefill_chunk < 1:
            raise DsvError(f"--prefill-chunk must be >= 1, got {self.prefill_chunk}")
        if any(not s for s in self.stop):
            raise DsvError("--stop strings must not be empty")


def prefill(model: Model, ids: list[int], cache: KVCache, chunk: int,
            on_progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Run the prompt in chunks; return the logits of its last position [vocab]."""
    logits = None
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        logits = model.forward(part, cache, last_only=True)[-1]
        if on_progress:
            on_progress(len(part))
    return logits


class _StopFilter:
    """Holds back text that might be the start of a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending, self.hit = stops, "", False

    def push(self, text: str) -> str:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                self.hit = True
                out, self.pending = self.pending[:i], ""
                return out
        keep = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate(model: Model, tok: Tokenizer, prompt_ids: list[int], gen: GenerationConfig,
             cache: KVCache | None = None, stats: GenerationStats | None = None,
             on_prefill: Callable[[int], None] | None = None) -> Iterator[str]:
    """Yield generated text pieces; fills `stats` as it goes."""
    stats = stats if stats is not None else GenerationStats()
    if not prompt_ids:
        raise DsvError("the prompt is empty")
    capacity = cache.capacity if cache else len(prompt_ids) + gen.max_tokens
    if len(prompt_ids) > capacity:
        raise DsvError(f"the prompt has {len(prompt_ids)} tokens, more than the context "
                       f"length {capacity}")
    cache = cache or model.new_cache(capacity)
    rng = np.random.default_rng(gen.seed)
    stop_ids = {tok.eos_id, *gen.stop_ids}
    decoder, stopper = StreamDecoder(tok), _StopFilter(gen.stop)

    t0 = time.perf_counter()
    logits = prefill(model, prompt_ids, cache, gen.prefill_chunk, on_prefill)
    stats.prompt_tokens = len(prompt_ids)
    stats.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    stats.stop_reason = "length"
    for i in range(gen.max_tokens):
        next_id = sample(logits, gen.sampling, rng)
        stats.generated_tokens += 1
        if i == 0:
            stats.first_token_s = time.perf_counter() - t0
        if next_id in stop_ids:
            stats.stop_reason = "eos"
            break
        text = stopper.push(decoder.push(next_id))
        if text:
            yield text
        if stopper.hit:
            stats.stop_reason = "stop"
            break
        if i + 1 == gen.max_tokens:
            break
        if cache.pos >= cache.capacity:
            stats.stop_reason = "context"
            break
        logits = model.forward([next_id], cache, last_only=True)[-1]
        stats.decode_steps += 1
    if not stopper.hit:
        tail = stopper.push(decoder.flush()) + stopper.flush()
        if tail:
            yield tail
    stats.decode_s = time.perf_counter() - t1
