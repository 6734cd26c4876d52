# ktm — the two commands: `make train` and `make test`. Both install what they need first.
PYTHON     ?= python3
VENV       ?= .venv
# torch is pinned here (not in pyproject) so a fresh machine takes the local CPU wheel instead of a
# multi-GB CUDA build; override for GPUs, e.g. make install TORCH_SPEC="torch==2.13.0" (CUDA index).
TORCH_SPEC ?= torch==2.13.0
EXP        ?= tree_k4
RUN        ?= default
K          ?= 1 2 4
SEEDS      ?=
COMPRESSORS ?=
ARGS       ?=
# READ: a reading experiment (read_k4, read_k1248, ...) whose checkpoint the task starts from. Made once
# into checkpoints/$(READ)/default (fit only: read_k1248 8-16 min on 2 cores with bf16, 28 in float32 on AVX2),
# then reused by every run while it was made with the experiment's current config (ktm fit --reuse; a
# changed recipe is refused with the setting that differs). Experiments with a READ_DEFAULT below start from
# it unless given READ= (empty).
# tree_k4: fully merged K=4 learns the tree in make train's budget only from a reading start
# (docs/results.md: 0.50 test balanced from scratch in a fresh clone, 0.79-0.94 in three seeds from read_k1248, 0.93-0.96
# with read_tree_k4 after it, below; 0.97-0.99 with both and 2000 steps on an Intel Xeon, the recipe since 2026-12-06).
READ_DEFAULT_tree_k4 := read_k1248
# amazon_k4: the same two stages lift K=4 test balanced accuracy in every seed (0.696 +- 0.023 against 0.640 +- 0.003
# from scratch, docs/results.md); its own reading stage is read_amazon_k4 (below).
READ_DEFAULT_amazon_k4 := read_k1248
# rt_k4: the same two stages, its own reading stage read_rt_k4 (one seed measured: docs/results.md).
READ_DEFAULT_rt_k4 := read_k1248
# commitpack_k2: read_k1248, then read_commitpack_k2 on the seed's training commits (copy-only since 2026-12-07), then one
# K=2 epoch over ~230 commits, every stage spread: val K=2 1.36x a K=1 LoRA on the same commits (seed 0; the recipe
# before it 1.50-1.68x, 1.81x from read_k1248 alone, 2.13x from scratch; docs/results.md).
READ_DEFAULT_commitpack_k2 := read_k1248
# commitpack_k4: the same chain at K=4 (read_commitpack_k4: K=4 -20% val, -13.5% test over 3 seeds against read_k1248
# alone; copy-only -9.5% val over 3 seeds; no distillation as good at 36% less time): val K=4 3.00-3.04x a K=1 LoRA on
# the same commits (docs/results.md).
READ_DEFAULT_commitpack_k4 := read_k1248
# tree_k1248 (one checkpoint for K = 1, 2, 4, 8): tree_k4's two stages, the tree's own text read with a K=8 encoder too.
READ_DEFAULT_tree_k1248 := read_k1248
READ       ?= $(READ_DEFAULT_$(EXP))
# TASK_READ: a second reading stage, on the task's own training text (labels dropped), started from READ's
# checkpoint and run once per seed: it reads that seed's training split, so it is never shared across seeds.
# Its run is checkpoints/$(TASK_READ)/seed<seed> (reused while its config is the same, whatever RUN is);
# the task then starts from it instead of READ. TASK_READ= skips it; READ= (from scratch) skips both.
TASK_READ_DEFAULT_tree_k4 := read_tree_k4
TASK_READ_DEFAULT_amazon_k4 := read_amazon_k4
TASK_READ_DEFAULT_rt_k4 := read_rt_k4
TASK_READ_DEFAULT_tree_k1248 := read_tree_k4
TASK_READ_DEFAULT_commitpack_k2 := read_commitpack_k2
TASK_READ_DEFAULT_commitpack_k4 := read_commitpack_k4
TASK_READ  ?= $(if $(strip $(READ)),$(TASK_READ_DEFAULT_$(EXP)))
# TASK_READ_ARGS: arguments for the TASK_READ fits only (ARGS go to the task), e.g. '--model.ks=[1,2,4,8]' when
# the task trains K=8 too (docs/results.md, one checkpoint for every K). TASK_READ_TAG names those runs apart
# (seed<seed><tag>, default<tag>): a run of the plain recipe is reused only by the same config, else refused.
TASK_READ_ARGS_DEFAULT_tree_k1248 := '--model.ks=[1,2,4,8]'
TASK_READ_TAG_DEFAULT_tree_k1248 := _k1248
TASK_READ_ARGS ?= $(TASK_READ_ARGS_DEFAULT_$(EXP))
TASK_READ_TAG  ?= $(TASK_READ_TAG_DEFAULT_$(EXP))
# POSITIONS: where every stage of the chain (READ, TASK_READ and the task) puts the merged embeddings, as
# model.merged_positions: compact (the paper's, the default) or spread (each at its block's last token's position in the
# uncompressed prompt; docs/results.md "Merged embeddings at their source positions"). A stage learns the layout it
# reads, so spread goes to all of them, and its reading runs are named apart (default_spread, seed<seed>_spread).
# commitpack_k4: spread (val K=4 -9.3%, test -6.3% against compact, lower in each of 3 seeds; docs/results.md, 2026-12-07).
# commitpack_k2: spread (val K=2 -3.4% against compact after the same epoch, seed 0; docs/results.md, "CommitPackFT at
# K=2: spread positions through the chain").
POSITIONS_DEFAULT_commitpack_k2 := spread
POSITIONS_DEFAULT_commitpack_k4 := spread
POSITIONS  ?= $(or $(POSITIONS_DEFAULT_$(EXP)),compact)
$(if $(filter-out compact spread,$(POSITIONS)),$(error POSITIONS=$(POSITIONS) is not a layout: use POSITIONS=compact or POSITIONS=spread))
POS_ARGS   := $(if $(filter spread,$(POSITIONS)), --model.merged_positions=spread)
POS_TAG    := $(if $(filter spread,$(POSITIONS)),_spread)
BIN        := $(VENV)/bin
RUN_DIR    := checkpoints/$(EXP)/$(RUN)
READ_DIR   := checkpoints/$(READ)/default$(POS_TAG)
INIT_ARGS  := $(if $(strip $(READ)), --model.init_from=$(READ_DIR)/export)
# The fair uncompressed reference: the same experiment and budget, trained at K=1 only. One encoder lr
# (unused at K=1) because a per-K dict in the experiment would name encoders that no longer exist.
REFERENCE_ARGS := --model.ks=[1] --data.k_schedule=[1] --model.lr_encoder=0.0001

# $(call fit_test_exp,EXP,RUN,EXTRA): fit + test checkpoints/EXP/RUN with EXTRA; one shell line (it sits in loops).
# ktm test without --ckpt_path evaluates the run's model: best.ckpt where checkpoint.monitor selected one, else last.ckpt.
fit_test_exp = $(BIN)/ktm fit --exp $(1) --run $(2) $(3) && \
  $(BIN)/ktm test --config checkpoints/$(1)/$(2)/config.yaml
# $(call fit_test,RUN,EXTRA): the same for $(EXP), with $(ARGS) after EXTRA (ARGS wins). ARGS is not a call
# argument since its commas ([1,2]) would split it.
fit_test = $(call fit_test_exp,$(EXP),$(1),$(2)$(POS_ARGS) $(ARGS))
# $(call read_fit,CHECK): READ's reading fit into checkpoints/$(READ)/default$(POS_TAG) (reused once made); nothing without READ.
read_fit = $(if $(strip $(READ)),$(BIN)/ktm fit --exp $(READ) --run default$(POS_TAG) --reuse$(POS_ARGS)$(1))
# $(call task_read,SEED_ARGS,NAME,CHECK): the TASK_READ fit of one seed into checkpoints/$(TASK_READ)/NAME, then "&&";
# nothing without TASK_READ. $(call start_args,NAME): where the task starts, that fit's export or READ's.
task_read = $(if $(strip $(TASK_READ)),$(BIN)/ktm fit --exp $(TASK_READ) --run $(2)$(TASK_READ_TAG)$(POS_TAG) --reuse $(1)$(INIT_ARGS)$(if \
  $(strip $(TASK_READ_ARGS)), $(TASK_READ_ARGS))$(POS_ARGS)$(3) &&)
start_args = $(if $(strip $(TASK_READ)), --model.init_from=checkpoints/$(TASK_READ)/$(1)$(TASK_READ_TAG)$(POS_TAG)/export,$(INIT_ARGS))
# $(call per_seed,RUN,EXTRA[,STEP,CHECK]): STEP (default fit_test) into RUN_s<seed> for each of $(SEEDS), seeding both
# Lightning and the data, each from its own TASK_READ run where there is one (else from READ); CHECK goes to that fit.
per_seed = for s in $(SEEDS); do $(call task_read,--seed_everything=$$s --data.seed=$$s,seed$${s},$(4)) \
  $(call $(or $(3),fit_test),$(1)_s$$s,$(2)$(call start_args,seed$${s}) --seed_everything=$$s --data.seed=$$s) || exit 1; done
# $(call preflight,RUN,EXTRA): every fit make train/reference is about to run (READ, TASK_READ and the task, per seed),
# given --check first: settings, benchmark options and run folders, seconds each, nothing loaded. A mistake in the
# task's config or a task run folder that is taken fails at once, not after the reading stages (up to 40 minutes).
task_check = $(BIN)/ktm fit --exp $(EXP) --run $(1) $(2)$(POS_ARGS) $(ARGS) --check
preflight = $(if $(strip $(READ)),$(call read_fit, --check) &&) $(if $(strip $(SEEDS)),$(call \
  per_seed,$(1),$(2),task_check, --check),$(call task_read,,default, --check) $(call task_check,$(1),$(2)$(call start_args,default)))

.PHONY: install constraints reading train reference test test-fast lint bench sweep compare tensorboard data clean-runs

# constraints.txt pins every dependency to the versions the README results were measured with.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]" "$(TORCH_SPEC)"
	touch $@

## rewrite constraints.txt from the packages now in .venv (on purpose only: commit it with the new results)
constraints:
	$(BIN)/python -m ktm.environment constraints

## the reading checkpoint of READ (made once, then reused): make reading READ=read_k4
## its held-out numbers: ktm test --config checkpoints/$(READ)/default/config.yaml --ckpt_path .../last.ckpt
reading: install
	$(call read_fit,)

## train + test one experiment: make train EXP=tree_k4 [RUN=name] [SEEDS="0 1 2"] [READ=read_k4] [ARGS="--trainer.max_epochs=1"]
##   [TASK_READ_ARGS="--model.ks=[1,2,4,8]" TASK_READ_TAG=_k1248] [POSITIONS=spread]
## SEEDS: one run per seed into $(RUN)_s<seed>, then the mean ± std over seeds (ktm report checkpoints/$(EXP))
## READ: start from that reading experiment's checkpoint (made first when missing; README "Reading stage");
##       tree_k4 starts from read_k1248 by default, READ= starts it from scratch
train: install
	$(call preflight,$(RUN),)
	$(call read_fit,)
ifeq ($(strip $(SEEDS)),)
	$(call task_read,,default) true
	$(BIN)/ktm fit --exp $(EXP) --run $(RUN)$(call start_args,default)$(POS_ARGS) $(ARGS)
	$(BIN)/ktm test --config $(RUN_DIR)/config.yaml
	@echo "metrics: $(RUN_DIR)/metrics.json   model: $(RUN_DIR)/export   (make tensorboard)"
else
	$(call per_seed,$(RUN),)
	$(BIN)/ktm report checkpoints/$(EXP)
endif

## the uncompressed reference beside the merged runs: make reference EXP=tree_k4 [SEEDS="0 1 2"] -> k1ref[_s<seed>]
## it starts from the same reading checkpoint as make train (READ), so both spend the same budget before the task
reference: install
	$(call preflight,k1ref,$(REFERENCE_ARGS))
	$(call read_fit,)
ifeq ($(strip $(SEEDS)),)
	$(call task_read,,default) true
	$(call fit_test,k1ref,$(REFERENCE_ARGS)$(call start_args,default))
else
	$(call per_seed,k1ref,$(REFERENCE_ARGS))
endif
	$(BIN)/ktm report checkpoints/$(EXP)

## one run per K, comparable in one TensorBoard: make sweep EXP=tree K="1 2 4"
sweep: install
	for k in $(K); do \
	  $(BIN)/ktm fit --exp $(EXP) --run k$$k --model.ks=[$$k] --data.k_schedule=[$$k] $(ARGS) && \
	  $(BIN)/ktm test --config checkpoints/$(EXP)/k$$k/config.yaml || exit 1; \
	done

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

## ruff on the code and the tests (rules in pyproject.toml [tool.ruff])
lint: install
	$(BIN)/ruff check ktm tests

bench: install
	$(BIN)/ktm bench $(ARGS)

# CPU presets of `make compare` (2 cores, K=4, all seven cells): every cell gets the same step budget instead
# of the experiment's max_time, so a slower machine runs longer but compares the same thing.
#   tree_k4: the question stays in tokens (fully merged K=4 does not learn in this budget: docs/results.md),
#            200 steps a cell, about 2.5 h for the seven cells (measured 2026-12-01).
#   amazon_k4: 174 steps a cell (two 87-step epochs: the merge's K=1 epoch, then one at K=4), 600 test sentences.
COMPARE_PRESET_tree_k4   := --model.keep_marked=true --trainer.max_steps=200 --trainer.max_time=null
COMPARE_PRESET_amazon_k4 := --trainer.max_steps=174 --trainer.max_time=null --data.max_test_examples=600
PRESET ?= $(COMPARE_PRESET_$(EXP))

## merge vs the baseline compressors at the same compression: make compare EXP=tree_k4 [COMPRESSORS="merge truncate_tail"] [K="4"] [ARGS=...]
## one run per cell into checkpoints/$(EXP)/cmp_<compressor>_k<K> (reused when complete, resumed when half-finished),
## then checkpoints/compare/$(EXP)/results.{json,md} and pareto.png. K defaults to 4 here (the sweep's K="1 2 4" is not taken).
## The experiment's CPU preset (above) comes before ARGS, so ARGS win; PRESET= runs the experiment's own budget.
compare: install
	$(BIN)/ktm compare --exp $(EXP)$(if $(strip $(COMPRESSORS)), --compressors $(COMPRESSORS))$(if $(filter command line,$(origin K)), --ks $(K)) $(PRESET) $(ARGS)

tensorboard: install
	$(BIN)/tensorboard --logdir checkpoints --bind_all

data: install
	$(BIN)/ktm data build --benchmark tree
