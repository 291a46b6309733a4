# Two commands on a fresh machine: `make demo` (the steering preset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU torch wheel lives in a local folder on these machines; elsewhere pip finds it on its index.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# The steering preset: a length dial (Conciseness against Detail), what `make demo` trains.
STEERABLE := configs/steer_length_dial_cpu.yaml
CONFIG ?= $(STEERABLE)
ARGS ?=

.PHONY: install demo eval export serve lint test test-unit bandit bench docs clean

# Bytecode is cached at first import, as Python does by default: where PYTHONDONTWRITEBYTECODE is
# set (these machines set it) every process, each Ray worker included, would compile torch and vLLM
# again, doubling the test time. Compiling all 4 GB of packages at install instead costs more than
# the fifth of them that a run imports.
unexport PYTHONDONTWRITEBYTECODE

install: $(VENV)/.installed

$(VENV)/.installed: requirements/cpu.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(FIND_LINKS) pip==26.3 setuptools==78.1.1 wheel==0.48.0
	$(PY) -m pip install -q --no-compile $(FIND_LINKS) --no-deps -r requirements/cpu.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(PY) orchestrator.py --config $(CONFIG) $(ARGS)

# Pareto front of a run: `make eval RUN=runs/demo [STEP=N | ALL=1 | BASE=1] [COMPARE="runs/a runs/b"] [ARGS="eval.heldout_prompts=16"]`.
# ALL=1 evaluates every kept checkpoint: the learning curve at these settings (RUN/eval/learning_curve_full.md, .png).
eval: install
	@test -n "$(RUN)" || { echo 'usage: make eval RUN=<run dir> [STEP=N | ALL=1 | BASE=1] [COMPARE="dirA dirB"]'; exit 2; }
	$(PY) evaluate.py --run $(RUN) $(ARGS) $(if $(STEP),--step $(STEP),) $(if $(ALL),--all-steps,) $(if $(BASE),--base,) $(if $(COMPARE),--compare $(COMPARE),)

# The steering preset by name, whatever CONFIG says (`make demo`'s run, in runs/demo); what it reaches: docs/steering.md.
train-steerable: install
	$(PY) orchestrator.py --config $(STEERABLE) $(ARGS)

# The policy of a checkpoint as a Hugging Face folder (+ PEFT adapter): `make export RUN=runs/demo [STEP=N] [OUT=dir]`.
export: install
	@test -n "$(RUN)" || { echo 'usage: make export RUN=<run dir> [STEP=N] [OUT=dir]'; exit 2; }
	$(PY) export.py --run $(RUN) $(if $(STEP),--step $(STEP),) $(if $(OUT),--out $(OUT),)

# An exported policy behind an OpenAI-compatible API on Ray Serve: `make serve MODEL=runs/demo/final [PORT=8000]`.
serve: install
	@test -n "$(MODEL)" || { echo 'usage: make serve MODEL=<exported folder> [PORT=8000]'; exit 2; }
	$(PY) serve.py --config configs/serve/local.yaml --model $(MODEL) $(if $(PORT),port=$(PORT),) $(ARGS)

# One voice across modules: a fixed rule set (pyproject.toml) and the formatter; `make test` runs it first.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two workers, a test file each at a time (module fixtures stay in one process): the integration
# tests mostly wait on actor processes starting, so two overlap well even on 2 cores. Files go out
# in the order tests/conftest.py gives them, slowest first (xdist would otherwise send the files
# with the most tests first and leave the one-test job file running alone at the end).
# TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: install lint
	$(PY) -m pytest -q --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) tests

test-unit: install
	$(PY) -m pytest -q tests/unit

# This loop beside TRL's online DPO trainer, same model, shapes and rewards (benchmarks/vs_trl.py; ~15 min on 2 cores).
bench: install $(VENV)/.bench-installed
	$(PY) -m benchmarks.vs_trl $(ARGS)

$(VENV)/.bench-installed: pyproject.toml
	@# The `bench` extra's pin; TRL's own requirements are all in the pinned set already.
	$(PY) -m pip install -q --no-deps $$($(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench'])")
	touch $@

# MOPO's closed form on a synthetic preference bandit (a side study, off the training path).
bandit: install
	$(PY) -m benchmarks.mopo_bandit

docs: install
	$(PY) -m moalign.config_docs

clean:
	rm -rf $(VENV) runs
