"""Efficiency: parameters, checkpoint size, prefill / decode speed and peak memory.

Timings use random prompt tokens (speed does not depend on the text), untimed warm-up runs, the
device synchronised around every timed span, and the median over `repeats`, for several batch
sizes. Decoding is an explicit greedy loop over the KV cache (one token per sequence per step), so
decode speed is not diluted by the prefill or by `generate`'s bookkeeping.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch

from ..artifacts.checkpoint import unique_state_dict
from ..errors import PruneLabError

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> int:
    """Exact size of the .safetensors file of `tensors`, without serialising them.

    Layout: 8-byte header length, JSON header padded with spaces to 8 bytes, raw tensor data,
    tensors laid out by dtype (widest first) then by name.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        dtype = SAFETENSORS_DTYPES.get(t.dtype)
        if dtype is None:
            raise PruneLabError(f"cannot size tensor '{name}' of dtype {t.dtype} as safetensors")
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_len = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + header_len + (-header_len) % 8 + offset


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS (whole lifetime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024   # Linux reports KiB
    return rss_bytes / 2**20, "process_peak_rss"


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_lengths(model, prompt_len: int, gen_tokens: int, batch_sizes: list[int], repeats: int) -> None:
    if prompt_len < 1 or gen_tokens < 1 or not batch_sizes or min(batch_sizes) < 1 or repeats < 1:
        raise PruneLabError("eval.efficiency needs prompt_len >= 1, gen_tokens >= 1, batch sizes >= 1, "
                            "repeats >= 1")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt_len + gen_tokens > limit:
        raise PruneLabError(f"eval.efficiency prompt_len + gen_tokens = {prompt_len + gen_tokens} exceeds "
                            f"the model's max_position_embeddings={limit}")


def timed_generation(model, prompt: torch.Tensor, gen_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s for gen_tokens steps): greedy, KV cache, last-position logits only.

    Prefill fills the cache from the prompt and gives the first token; each decode step feeds one
    token per sequence. The device is synchronised at both ends of each timed span.
    """
    device = prompt.device
    sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill = time.perf_counter() - start
    cache = out.past_key_values
    start = time.perf_counter()
    for _ in range(gen_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    return prefill, time.perf_counter() - start


def measure(model, prompt: torch.Tensor, gen_tokens: int, repeats: int, warmup: int) -> dict:
    """Median prefill and decode times over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):                 # allocator, kernel selection, lazy init
        timed_generation(model, prompt, gen_tokens)
    runs = [timed_generation(model, prompt, gen_tokens) for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    batch, prompt_len = prompt.shape
    return {"prefill_latency_ms": prefill * 1e3, "prefill_tokens_per_s": batch * prompt_len / prefill,
            "decode_ms_per_token": decode / gen_tokens * 1e3, "decode_tokens_per_s": batch * gen_tokens / decode,
            "generate_latency_ms": statistics.median(a + b for a, b in runs) * 1e3,
            "generate_tokens_per_s": batch * gen_tokens / statistics.median(a + b for a, b in runs)}


@torch.no_grad()
def efficiency(model, tokenizer, prompt_len: int = 128, gen_tokens: int = 32, batch_sizes=(1, 8),
               repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict:
    """Parameters, checkpoint size, and per batch size: prefill and decode speed, peak memory.

    Keys efficiency/bs<B>/<metric> for every batch size; the first batch size also under the
    flat efficiency/<metric> keys. Prompts are random tokens (speed does not depend on the text).
    """
    batch_sizes = [int(b) for b in batch_sizes]
    check_lengths(model, prompt_len, gen_tokens, batch_sizes, repeats)
    was_training = model.training
    model.eval()
    device = model.device
    vocab = min(len(tokenizer), model.config.vocab_size) if tokenizer is not None else model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    out = {"efficiency/params": sum(p.numel() for p in model.parameters()),
           "efficiency/checkpoint_bytes": safetensors_bytes(unique_state_dict(model)[0], {"format": "pt"}),
           "efficiency/prompt_len": prompt_len, "efficiency/gen_tokens": gen_tokens,
           "efficiency/device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for i, batch in enumerate(batch_sizes):
            prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
            times = measure(model, prompt, gen_tokens, repeats, warmup)
            out.update({f"efficiency/bs{batch}/{k}": v for k, v in times.items()})
            if i == 0:
                out.update({f"efficiency/{k}": v for k, v in times.items()})
    finally:
        model.train(was_training)
    memory, memory_kind = peak_memory_mb(device)
    return out | {"efficiency/peak_memory_mb": memory, "efficiency/peak_memory_kind": memory_kind}
