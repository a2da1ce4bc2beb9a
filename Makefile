# Two commands for a new user: `make demo` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := true
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "installing torch 2.13.0 (CPU build; a range it satisfies installs nothing more)"
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

## demo: the retrain flow on the full easy-VQA data set (DVC stages, 2 candidates, registry, bento)
demo: install
	$(BIN)/mmops run

## test: the whole suite on two cores: two pytest-xdist workers (tests grouped by file, the shared
## trained project's tests on one worker), then the latency-bound tests (marked `exclusive`) alone, so
## that no other test shares the cores with them. Both sessions use one trained project, kept in a
## temporary folder for the length of the command; the 25 slowest tests are listed at the end of the first
## session (what to make smaller when the suite grows). TEST_WORKERS=0: everything in one process.
TEST_WORKERS ?= 2
test: install
ifeq ($(TEST_WORKERS),0)
	$(BIN)/pytest
else
	@shared=$$(mktemp -d -t mmops-tests.XXXXXX); status=0; \
	MMOPS_TEST_SHARED=$$shared $(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup -m "not exclusive" --durations=25 || status=$$?; \
	MMOPS_TEST_SHARED=$$shared $(BIN)/pytest -m exclusive || status=$$?; \
	rm -rf $$shared; exit $$status
endif

## test-fast: unit tests only (no training, no serving)
test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf data metrics models .mmops dvc.lock
