# tandem: `make demo` runs the story on a local cluster, `make test` runs the tests.
# Both install what they need on a fresh machine (Debian packages, a venv, the stubs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= /tmp/tandem-demo
PYTEST_ARGS ?=

.PHONY: all deps venv proto test unit lint demo bench-controller fuzz image clean

all: test

deps:
	bash scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

proto: venv
	$(PY) proto/generate.py

lint: proto
	$(VENV)/bin/ruff check csi_driver replication devtools tests bench proto fuzz scripts
	$(VENV)/bin/mypy csi_driver replication devtools
	$(VENV)/bin/mypy --strict tests fuzz scripts
	$(PY) scripts/check_sizes.py

test: deps proto lint
	bash scripts/ensure-kubectl.sh $(VENV)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

unit: proto
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

demo: deps proto
	$(PY) -m devtools.demo --dir $(DEMO_DIR)

# Coverage-guided fuzzing (atheris); new corpus entries land in fuzz/corpus/ and `make test`
# replays them. FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 300
fuzz: proto
	$(VENV)/bin/pip install -q atheris
	for t in replication_server replication_client handshake nbd_server; do \
		$(PY) -m fuzz.run --target $$t --seconds $(FUZZ_SECONDS) || exit 1; done

bench-controller: deps proto
	$(PY) bench/bench_controller.py --dir /tmp/tandem-bench-controller

# The container image (needs a container engine; docs/image.md). IMAGE_ARGS="--load kind" ...
image:
	bash scripts/build-image.sh $(IMAGE_ARGS)

clean:
	rm -rf $(VENV) csi_driver/_gen/*_pb2*.py csi_driver/_gen/*_pb2*.pyi
