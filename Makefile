# Everything runs from nothing: `make demo` and `make test` create the environment if missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint format bench clean mutation throughput gpu-check

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

# Mutation testing (slow, not part of `make test`): plants faults one at a time in a copy of the
# code and counts those the tests miss; see benchmarks/mutation.py. Narrow it with e.g.
# MUTATION_ARGS="--kind method --only fixmatch"; results in benchmarks/results/mutation.json.
mutation: $(STAMP)
	$(BIN)/python benchmarks/mutation.py --jobs $${MUTATION_JOBS:-2} $(MUTATION_ARGS)

# Training throughput, side by side (library path vs per-image loader vs the limit); on a CPU at
# the small sizes, on a GPU at full size: `make throughput THROUGHPUT_ARGS="--workers 2 8"`.
throughput: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python benchmarks/throughput.py $${THROUGHPUT_ARGS:---small --device cpu}

# The one-command GPU check (benchmarks/gpu_check.sh): run it on a GPU machine from the checkout;
# `bash benchmarks/prepare_gpu_wheels.sh` first, where it has network, for a machine without.
gpu-check:
	bash benchmarks/gpu_check.sh --out $${OUT:-gpu_check_out}
