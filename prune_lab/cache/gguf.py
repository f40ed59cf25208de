"""GGUF checkpoints in, the conversion: transformers reads GGUF (`from_pretrained(dir, gguf_file=name)`)
and dequantizes every tensor to the requested dtype (the weights keep the file's rounding). The model
it returns carries a GGUF `quantization_config` and refuses `save_pretrained`, so it is rebuilt from
its config without that entry: a plain model of the same class, which prune_lab can prune, save and export.

The conversion is cached, content-keyed like the score cache: xxh3-128 of the file's bytes + the
dtype, under `<cache dir>/gguf/<key>/` (model/, tokenizer/, a manifest with the source description
and a checksum of every file). An entry is written atomically (prune_lab.atomic); one that is
corrupt or unreadable is converted again after a warning; a cache dir that cannot be written gives
a warning and the job goes on without it. An architecture prune_lab does not prune is refused
before any conversion.
"""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from ..artifacts.gguf_read import (
    check_file,
    file_digest,
    first_line,
    read_header,
    require_gguf,
    source_info,
)
from ..atomic import atomic_dir, write_json_atomic
from ..errors import PruneLabError, UnsupportedArchitecture

log = logging.getLogger("prune_lab")
MANIFEST = "prune_lab_gguf.json"
FORMAT = 1                           # bump when the entry layout changes: older entries are converted again


@contextmanager
def _conversion_errors(path):
    try:
        yield
    except PruneLabError:
        raise
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError, ImportError, TypeError) as e:
        raise PruneLabError(f"cannot convert GGUF file '{path}' with transformers ({first_line(e)})") from e


def plain_model(loaded, dtype: torch.dtype, attn_implementation: str):
    """The same model without the GGUF quantization_config (transformers refuses to save that one)."""
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model.eval()


def convert(path: Path, dtype: torch.dtype, attn_implementation: str):
    """(plain HF model in `dtype`, tokenizer), both read from the file by transformers."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, name = str(path.parent), path.name
    # dequantize=True: a plain dense model whatever kernels are installed (newer transformers can keep
    # some architectures' blocks packed, which prune_lab cannot slice)
    quant = {"quantization_config": transformers.GgufConfig(dequantize=True)} \
        if hasattr(transformers, "GgufConfig") else {}
    with _conversion_errors(path):
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype,
                                                      attn_implementation=attn_implementation, **quant)
        model = plain_model(loaded, dtype, attn_implementation)
        del loaded
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


class ConversionCache:
    """<dir>/gguf/<xxh3>-<dtype>/: model/ and tokenizer/ (save_pretrained) + manifest with checksums."""

    def __init__(self, directory: str | Path | None):
        self.dir = Path(directory).expanduser() / "gguf" if directory else None

    def path(self, key: str) -> Path | None:
        return self.dir / key if self.dir else None

    def manifest(self, key: str) -> dict | None:
        """The entry's manifest if the entry is whole (every listed file present with its checksum)."""
        entry = self.path(key)
        if entry is None or not entry.exists():
            return None
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
            files = manifest["files"]
            problem = ("it is an older format" if manifest.get("format") != FORMAT else
                       "it has no model config" if "model/config.json" not in files else
                       next((f"{rel} is missing or its checksum does not match" for rel, digest in files.items()
                             if not (entry / rel).is_file() or file_digest(entry / rel) != digest), None))
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"its manifest cannot be read ({first_line(e)})"
        if problem is None:
            return manifest
        log.warning("GGUF conversion cache entry %s is corrupt or incomplete (%s): converting again", entry, problem)
        return None

    def get(self, key: str, dtype: torch.dtype, attn_implementation: str):
        """(model, tokenizer, source info) from a whole entry, or None (after a warning if it was corrupt)."""
        manifest = self.manifest(key)
        if manifest is None:
            return None
        entry = self.path(key)
        try:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(str(entry / "model"), dtype=dtype,
                                                         attn_implementation=attn_implementation)
            tokenizer = saved_tokenizer(entry / "tokenizer")
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            log.warning("GGUF conversion cache entry %s cannot be loaded (%s): converting again", entry, first_line(e))
            return None
        return model.eval(), tokenizer, manifest["source"]

    def put(self, key: str, model, tokenizer, info: dict) -> None:
        entry = self.path(key)
        if entry is None:
            return
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with atomic_dir(entry) as tmp:
                model.save_pretrained(str(tmp / "model"))
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
                files = {str(p.relative_to(tmp)): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
                write_json_atomic(tmp / MANIFEST, {"format": FORMAT, "source": info, "files": files})
        except OSError as e:
            log.warning("cannot write the GGUF conversion cache entry %s (%s): going on without it", entry,
                        first_line(e))


def saved_tokenizer(directory: Path):
    """The tokenizer as the very class it was saved as (AutoTokenizer could map the model type to
    another class with its own pre-tokenizer)."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    declared = json.loads((directory / "tokenizer_config.json").read_text())
    cls = tokenizer_class_from_name(declared.get("tokenizer_class") or "")
    return (cls or AutoTokenizer).from_pretrained(str(directory))


def cache_key(digest: str, dtype: torch.dtype) -> str:
    return f"{digest}-{str(dtype).removeprefix('torch.')}"


def load_gguf(path: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa",
              cache_dir: str | Path | None = None, check_family: Callable[[str], None] | None = None):
    """(model, tokenizer, source info) of a GGUF file; cache_dir=None converts without caching.

    check_family(architecture) raises for a family the caller cannot handle, before any conversion.

    The source info describes the file (name, size, xxh3-128, architecture, quantization type and the
    ggml type of every tensor, the dtype it was dequantized to) and says whether the weights came
    from the conversion cache (`conversion`: cached | converted).
    """
    p = check_file(path)
    require_gguf()
    digest = file_digest(p)
    cache, key = ConversionCache(cache_dir), cache_key(digest, dtype)
    hit = cache.get(key, dtype, attn_implementation)
    if hit is not None:
        model, tokenizer, info = hit
        log.info("GGUF %s: HF weights from the conversion cache %s", p.name, cache.path(key))
        model.config.name_or_path = str(p)      # not the cache entry's dir: the score cache keys hash the config
        return model, tokenizer, {**info, "conversion": "cached"}
    header = read_header(p)
    if check_family is not None:
        try:
            check_family(header["architecture"])
        except UnsupportedArchitecture as e:
            raise UnsupportedArchitecture(f"GGUF file '{path}': {e}") from None
    model, tokenizer = convert(p, dtype, attn_implementation)
    info = source_info(p, digest, header, dtype)
    model.config.name_or_path = str(p)          # as a cached load says it: both fingerprint the same
    cache.put(key, model, tokenizer, info)
    return model, tokenizer, {**info, "conversion": "converted"}


def describe(path: str | Path, dtype: torch.dtype, cache_dir: str | Path | None = None) -> dict:
    """The source info of a file without loading it (from its cache entry if whole, else its header)."""
    p = check_file(path)
    digest = file_digest(p)
    manifest = ConversionCache(cache_dir).manifest(cache_key(digest, dtype))
    return manifest["source"] if manifest else source_info(p, digest, read_header(p), dtype)
