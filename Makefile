# alexnet-dist: `make demo` sets everything up and runs the main job; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_PACKAGES := redis-server dataset-fashion-mnist gcc libc6-dev libjpeg-dev chromium chromium-driver

# demo knobs: `make demo EPOCHS=8`, `make demo SEED=1` (the job's seed), `make demo S3=1` (a local S3 server
# instead of local folders)
EPOCHS ?=
SEED ?=
S3 ?= 0

.PHONY: setup system-packages demo test lint bench gpu-check clean-demo

KERNELS := alexnet_dist/kernels/lib/BUILD.json

setup: system-packages $(VENV)/.installed $(KERNELS)

# Debian packages the project needs: a Redis server, the real Fashion-MNIST data set, a headless browser
# for the dashboard's tests (chromium, chromium-driver), and a C compiler and libjpeg's headers for the
# CPU kernels (alexnet_dist/kernels/csrc, built once by setup; without them the model and loader fall
# back to torch ops, slower, same numbers).
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v cc >/dev/null || missing="$$missing gcc libc6-dev"; \
	[ -e /usr/include/jpeglib.h ] || missing="$$missing libjpeg-dev"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "python >= 3.10 needed"'
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The C kernels, built once for this machine's CPU (again when a source changes); nothing compiles at
# run time.
$(KERNELS): $(VENV)/.installed $(wildcard alexnet_dist/kernels/csrc/*.c)
	$(PY) -m alexnet_dist.kernels.library

demo: setup
	EPOCHS="$(EPOCHS)" SEED="$(SEED)" S3="$(S3)" PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: setup
	$(BIN)/ruff check alexnet_dist tests bench
	$(BIN)/ruff format --check alexnet_dist tests bench
	$(BIN)/lint-imports pyproject.toml
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q --durations=15

lint: setup
	$(BIN)/ruff check alexnet_dist tests bench && $(BIN)/ruff format --check alexnet_dist tests bench
	$(BIN)/lint-imports pyproject.toml

bench: setup
	$(PY) bench/model.py

# The GPU check (docs/gpu.md): `make gpu-check OUT=dir [ARGS=--dry-run]` writes its JSON figures to dir; a CPU
# dry run where there is no CUDA. No setup step: a bare GPU box has no venv, so `make gpu-check PY=python3`.
gpu-check:
	$(if $(OUT),,$(error give a folder for the figures: make gpu-check OUT=dir))
	$(PY) bench/gpu_check.py $(OUT) $(ARGS)

clean-demo:
	rm -rf demo .stack
