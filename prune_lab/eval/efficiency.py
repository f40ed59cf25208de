"""Efficiency: parameters, checkpoint size, prefill / generation speed and peak memory.

Timings use random prompt tokens (speed does not depend on the text), one warm-up pass, and the
median over `repeats`. Generation is greedy with the KV cache and exactly `gen_tokens` new tokens.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch

from ..errors import PruneLabError

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def unique_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (a tied lm_head is stored once, as safetensors does)."""
    seen, out = set(), {}
    for name, tensor in sorted(model.state_dict().items()):
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


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


class Stopwatch:
    """Median wall time of a callable, synchronising CUDA so queued kernels are counted."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> float:
        fn()                                    # warm-up: allocator, kernels, lazy init
        times = []
        for _ in range(self.repeats):
            self._sync()
            start = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def check_lengths(model, prompt_len: int, gen_tokens: int, batch_size: int, repeats: int) -> None:
    if prompt_len < 1 or gen_tokens < 2 or batch_size < 1 or repeats < 1:
        raise PruneLabError("eval.efficiency needs prompt_len >= 1, gen_tokens >= 2, batch_size >= 1, "
                            "repeats >= 1")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt_len + gen_tokens > limit:
        raise PruneLabError(f"eval.efficiency prompt_len + gen_tokens = {prompt_len + gen_tokens} exceeds "
                            f"the model's max_position_embeddings={limit}")


@torch.no_grad()
def efficiency(model, tokenizer, prompt_len: int = 128, gen_tokens: int = 32, batch_size: int = 1,
               repeats: int = 3, seed: int = 0) -> dict:
    check_lengths(model, prompt_len, gen_tokens, batch_size, repeats)
    was_training = model.training
    model.eval()
    device = model.device
    vocab = min(len(tokenizer), model.config.vocab_size) if tokenizer is not None else model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen).to(device)
    mask = torch.ones_like(prompt)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    stopwatch = Stopwatch(device, repeats)
    prefill_s = stopwatch(lambda: model(input_ids=prompt, attention_mask=mask, use_cache=True))
    generate_s = stopwatch(lambda: model.generate(
        input_ids=prompt, attention_mask=mask, do_sample=False, use_cache=True,
        max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, pad_token_id=pad_id))
    memory, memory_kind = peak_memory_mb(device)
    model.train(was_training)

    new_tokens = batch_size * gen_tokens
    # The first new token comes out of the prefill; the other gen_tokens-1 are cached decode steps.
    decode_step_s = max(generate_s - prefill_s, 0.0) / (gen_tokens - 1)
    return {
        "efficiency/params": sum(p.numel() for p in model.parameters()),
        "efficiency/checkpoint_bytes": safetensors_bytes(unique_state_dict(model), {"format": "pt"}),
        "efficiency/prefill_latency_ms": prefill_s * 1e3,
        "efficiency/prefill_tokens_per_s": batch_size * prompt_len / prefill_s,
        "efficiency/generate_latency_ms": generate_s * 1e3,
        "efficiency/generate_tokens_per_s": new_tokens / generate_s,
        "efficiency/decode_ms_per_token": decode_step_s * 1e3,
        "efficiency/peak_memory_mb": memory,
        "efficiency/peak_memory_kind": memory_kind,
    }
