# One command each: `make test`, `make demo`. Both install into .venv first when it is missing or stale.
# The first Python >= 3.11 on PATH (3.11 first: torch==2.13.0 is pinned for it); override with `make PY=...`.
PY ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench proto docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@[ -n "$(PY)" ] || { echo "make install: need Python 3.11 or newer on PATH (or make PY=/path/to/python3.11)" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this pin resolves to the local CPU wheel; anything looser pulls a multi-GB CUDA build
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/fedkit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check provision runtime tests bench
	# hadolint and shellcheck over every Dockerfile and script of freshly rendered kits
	$(VPY) -m tests.kit_lint

bench: $(STAMP)
	$(VPY) bench/provision.py
	$(VPY) bench/round_overhead.py

proto: $(STAMP)
	$(VPY) -m grpc_tools.protoc -I runtime/proto --python_out=runtime/proto --grpc_python_out=runtime/proto runtime/proto/fedkit.proto
	sed -i 's/^import fedkit_pb2/from . import fedkit_pb2/' runtime/proto/fedkit_pb2_grpc.py

# the config reference page and each job template's JSON Schema, from the pydantic models (a test fails when stale)
docs: $(STAMP)
	$(VPY) -m provision.job_schema

clean:
	rm -rf $(VENV) build *.egg-info
