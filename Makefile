# ktm — the two commands: `make train` and `make test`. Both install what they need first.
PYTHON     ?= python3
VENV       ?= .venv
# torch is pinned here (not in pyproject) so a fresh machine takes the local CPU wheel instead of a
# multi-GB CUDA build; override for GPUs, e.g. make install TORCH_SPEC="torch==2.13.0" (CUDA index).
TORCH_SPEC ?= torch==2.13.0
EXP        ?= tree_k4
RUN        ?= default
K          ?= 1 2 4
ARGS       ?=
BIN        := $(VENV)/bin
RUN_DIR    := checkpoints/$(EXP)/$(RUN)

.PHONY: install train test test-fast bench sweep tensorboard data clean-runs

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]" "$(TORCH_SPEC)"
	touch $@

## train + test one experiment: make train EXP=tree_k4 [RUN=name] [ARGS="--trainer.max_epochs=1"]
train: install
	$(BIN)/ktm fit --exp $(EXP) --run $(RUN) $(ARGS)
	$(BIN)/ktm test --config $(RUN_DIR)/config.yaml --ckpt_path $(RUN_DIR)/checkpoints/last.ckpt
	@echo "metrics: $(RUN_DIR)/metrics.json   model: $(RUN_DIR)/export   (make tensorboard)"

## one run per K, comparable in one TensorBoard: make sweep EXP=tree K="1 2 4"
sweep: install
	for k in $(K); do \
	  $(BIN)/ktm fit --exp $(EXP) --run k$$k --model.ks=[$$k] --data.k_schedule=[$$k] $(ARGS) && \
	  $(BIN)/ktm test --config checkpoints/$(EXP)/k$$k/config.yaml --ckpt_path checkpoints/$(EXP)/k$$k/checkpoints/last.ckpt || exit 1; \
	done

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/ktm bench $(ARGS)

tensorboard: install
	$(BIN)/tensorboard --logdir checkpoints --bind_all

data: install
	$(BIN)/ktm data build --benchmark tree
