"""The tokenizer of a GGUF export (output.export=gguf), as llama.cpp reads it: tokenizer.ggml.* and
tokenizer.chat_template metadata.

Only byte-level BPE tokenizers (GPT-2 style: lab-llama, SmolLM2 as prune_lab loads it, Llama-3, Qwen2)
are described: the vocabulary in id order, the merges, a token type per id (control for special added
tokens, user-defined for other added tokens, normal otherwise, unused for embedding rows past the
vocabulary), bos/eos/unk/pad ids, whether a BOS is prepended, and the chat template. llama.cpp picks its
pre-tokenizer regex by `tokenizer.ggml.pre`; the name is read off the HF pre-tokenizer's structure (a
pre-tokenizer of another shape is refused in one line: llama.cpp would split text differently).
"""
from __future__ import annotations

import json

from ..errors import PruneLabError

# token types of llama.cpp (gguf.TokenType values)
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4
# the split patterns of the HF tokenizers llama.cpp names (as in their tokenizer.json files)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise PruneLabError(f"output.export=gguf needs a fast (tokenizers) tokenizer, not {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _byte_level(p: dict | None, regex: bool) -> bool:
    return bool(p) and p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for an HF byte-level pre-tokenizer, or None when it has none."""
    if _byte_level(pre, True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and _byte_level(steps[1], True) and steps[0].get("type") == "Digits" \
            and steps[0].get("individual_digits"):
        return "smollm"
    if len(steps) == 2 and _byte_level(steps[1], False) and steps[0].get("type") == "Split":
        pattern = steps[0].get("pattern", {}).get("Regex")
        return {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def check_tokenizer(tokenizer) -> None:
    """Right after loading: a tokenizer the GGUF metadata can describe, or one line."""
    if tokenizer is None:
        return
    spec = _spec(tokenizer)
    kind = spec.get("model", {}).get("type")
    if kind != "BPE" or spec["model"].get("byte_fallback"):
        raise PruneLabError(f"output.export=gguf writes byte-level BPE tokenizers (llama.cpp's gpt2 model); this "
                            f"one is {kind}{' with byte fallback' if kind == 'BPE' else ''}: use output.export=hf")
    if pre_tokenizer_name(spec.get("pre_tokenizer")) is None:
        raise PruneLabError(f"output.export=gguf: llama.cpp has no pre-tokenizer named for this tokenizer's "
                            f"{json.dumps(spec.get('pre_tokenizer'))[:120]} (known: GPT-2 byte level, SmolLM, "
                            f"Llama-3, Qwen2): use output.export=hf")


def tokenizer_metadata(tokenizer, n_vocab: int) -> dict:
    """The values of the GGUF tokenizer keys for an embedding of n_vocab rows (without the prefix)."""
    spec = _spec(tokenizer)
    vocab = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    if max(vocab.values()) >= n_vocab:
        raise PruneLabError(f"output.export=gguf: the tokenizer has ids up to {max(vocab.values())}, the "
                            f"embedding only {n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (CONTROL if added[text]["special"] else USER_DEFINED) if text in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    bos = tokenizer.bos_token_id
    meta = {"model": "gpt2", "pre": pre_tokenizer_name(spec.get("pre_tokenizer")), "tokens": tokens,
            "token_type": types, "merges": merges,
            "add_bos_token": bos is not None and with_special[:1] == [bos] and plain[:1] != [bos],
            "add_eos_token": tokenizer.eos_token_id is not None and with_special[-1:] == [tokenizer.eos_token_id]
            and plain[-1:] != [tokenizer.eos_token_id]}
    for key in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{key}_token_id", None)
        if value is not None:
            meta[f"{key}_token_id"] = int(value)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["chat_template"] = template
    return meta


def add_tokenizer(writer, meta: dict) -> None:
    """Write tokenizer_metadata's values with the gguf package's writer."""
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_type"])
    if meta["merges"]:
        writer.add_token_merges(meta["merges"])
    for key in ("bos", "eos", "unk", "pad"):
        if f"{key}_token_id" in meta:
            getattr(writer, f"add_{key}_token_id")(meta[f"{key}_token_id"])
    writer.add_add_bos_token(meta["add_bos_token"])
    writer.add_add_eos_token(meta["add_eos_token"])
    if "chat_template" in meta:
        writer.add_chat_template(meta["chat_template"])
