# Luna Stack: development, tests and the compose stack. `make help` lists the targets.
#
#   make up                   Redis + clip + vae + unet on GPU 0
#   make up LAYOUT=2gpu       CLIP on GPU 1, VAE + UNet on GPU 0 (compose/2gpu.env)
#   make up LAYOUT=cpu        no GPU: the host's network, everything on 127.0.0.1 (compose/cpu.yml)
#   make up COMFYUI=3         ... plus three ComfyUI containers (compose/docker-compose.comfyui.yml)

.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
BIN := $(VENV)/bin
# The venv's torch; on a GPU host e.g.
#   make venv TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
TORCH_SPEC ?= torch==2.13.0
# Re-install only when the dependencies (pyproject.toml) change.
VENV_STAMP := $(VENV)/.luna-installed

LAYOUT ?= 1gpu
COMFYUI ?= 0
SIZE ?= small

ifeq ($(filter $(LAYOUT),1gpu 2gpu cpu),)
$(error LAYOUT must be 1gpu, 2gpu or cpu, not '$(LAYOUT)')
endif
ifeq ($(LAYOUT)-$(filter-out 0,$(COMFYUI)),cpu-$(COMFYUI))
$(error the ComfyUI containers need a GPU: LAYOUT=cpu takes no COMFYUI)
endif
# Later --env-file entries win; compose/.env is named explicitly because --env-file replaces it.
ENV_FILES := $(if $(filter 2gpu,$(LAYOUT)),$(addprefix --env-file ,$(wildcard compose/.env) compose/2gpu.env))
COMPOSE_BASE := docker compose -f compose/docker-compose.yml $(if $(filter cpu,$(LAYOUT)),-f compose/cpu.yml)
COMPOSE_COMFYUI := $(COMPOSE_BASE) -f compose/docker-compose.comfyui.yml
# up/build use the files the variables ask for; down/logs/ps always see ComfyUI containers too.
COMPOSE := $(if $(filter 0,$(COMFYUI)),$(COMPOSE_BASE),$(COMPOSE_COMFYUI)) $(ENV_FILES)
COMPOSE_ALL := $(COMPOSE_COMFYUI) $(ENV_FILES)
SCALE := $(if $(filter 0,$(COMFYUI)),,--scale comfyui=$(COMFYUI))

.PHONY: help venv test test-gpu test-compose test-comfyui screenshot bench lint run fixtures build up down logs ps

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

venv: $(VENV_STAMP) ## create .venv and install luna-stack[server,dev] (TORCH_SPEC picks torch)

$(VENV_STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[server,dev]'
	touch $@

test: venv ## lint the Python code and run the CPU test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

test-gpu: venv ## run the tests that need a CUDA GPU
	$(BIN)/pytest -q -m gpu

# Root on Debian: its own Docker engine, images built without a registry, tests/test_compose_stack.py.
# LUNA_CI_CACHE (default ~/.cache/luna-stack-ci) keeps the engine's images, rootfs, wheels and Compose.
test-compose: venv ## build the images and run the compose stack in containers (root, Debian)
	VENV=$(abspath $(VENV)) bash tools/compose_test.sh

# The pack inside real ComfyUI (COMFYUI_PATH: a checkout; COMFYUI_PYTHON: a Python with ComfyUI's
# requirements, see docs/comfyui.md). Not in CI (no ComfyUI there): run before each release.
COMFYUI_PYTHON ?= $(BIN)/python
test-comfyui: venv ## the integration tests against real ComfyUI (COMFYUI_PATH=..., COMFYUI_PYTHON=...)
	test -n "$(COMFYUI_PATH)" || { echo "set COMFYUI_PATH to a ComfyUI checkout"; exit 2; }
	COMFYUI_PATH=$(COMFYUI_PATH) $(COMFYUI_PYTHON) -m pytest -q -p no:cacheprovider \
		tests/test_comfy_integration.py tests/test_comfy_dropin_comfyui.py tests/test_comfy_vae16_comfyui.py \
		tests/test_comfy_text_comfyui.py tests/test_comfy_flux_comfyui.py \
		tests/test_comfy_sd3_comfyui.py tests/test_comfy_flux_workflow_comfyui.py

screenshot: venv ## the status page in headless Chromium, saved to docs/status-page.png
	LUNA_REQUIRE_BROWSER=1 LUNA_STATUS_SCREENSHOT=docs/status-page.png $(BIN)/pytest -q tests/test_status_page.py

# Each bench/bench_*.py prints its table and writes bench/results/<name>.json itself (device named in it).
# BENCH_ARGS=--small runs them on the CPU fixtures.
BENCH_SCRIPTS := $(wildcard bench/bench_*.py)
BENCH_ARGS ?=
bench: venv ## run every bench/bench_*.py, results in bench/results/<name>.json
	set -e; for name in $(basename $(notdir $(BENCH_SCRIPTS))); do \
		echo "== $$name"; \
		$(BIN)/python -m bench.$$name $(BENCH_ARGS); \
	done

lint: venv ## ruff, hadolint on the Dockerfiles, compose files against the compose-spec schema
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint docker/*Dockerfile*
	$(BIN)/python -m tools.compose_yaml compose/*.yml

run: venv ## local mode: redis-server and the three services as processes, demo models
	$(BIN)/luna-stack run --demo

fixtures: venv ## write random-weight models in ComfyUI layout to models/ (SIZE=small|full)
	$(BIN)/luna-stack fixtures --out models --size $(SIZE)

build: ## build the images
	$(COMPOSE) build

up: ## start the stack and wait until it is healthy (LAYOUT=1gpu|2gpu|cpu, COMFYUI=N)
	$(COMPOSE) up -d --wait $(SCALE)

down: ## stop and remove the stack's containers (volumes are kept)
	$(COMPOSE_ALL) down

logs: ## follow the logs of every container
	$(COMPOSE_ALL) logs -f

ps: ## list the stack's containers and their health
	$(COMPOSE_ALL) ps
