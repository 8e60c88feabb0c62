# Everything runs from nothing: `make demo` and `make test` create the environment if missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint format bench clean

# torch/torchvision are pinned to the builds pip serves from this machine's disk (a CUDA build
# that runs on CPU); the package itself only asks for torch>=2.4.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled digits: FixMatch with 5 labels per class, W&B offline, prints test/acc.
demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/ssl-modules run --config configs/trainer/cpu.yaml \
		--config configs/data/digits.yaml --config configs/fixmatch.yaml

lint: $(STAMP)
	$(BIN)/ruff check ssl_modules datamodules tests benchmarks
	$(BIN)/ruff format --check ssl_modules datamodules tests benchmarks

test: lint
	WANDB_MODE=offline OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/pytest -q -p no:cacheprovider --durations=15

format: $(STAMP)
	$(BIN)/ruff check --fix ssl_modules datamodules tests benchmarks
	$(BIN)/ruff format ssl_modules datamodules tests benchmarks

# The README's results table (see README.md, "Results").
bench: $(STAMP)
	bash benchmarks/readme_tables.sh

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache
