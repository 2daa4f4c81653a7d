# The two commands of README.md. Both set up .venv first (scripts/setup.sh; quick when done).
#   make repro   - set up, then run the pipeline on the embedded default (tiny model, CPU)
#   make test    - set up, then run the test suite (in two processes: addopts in pyproject.toml)
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)

.PHONY: setup repro test
setup:
	bash scripts/setup.sh

repro: setup
	dvc repro

test:
	bash scripts/setup.sh --test
	python -m pytest -q
