# biflow-bench: every target sets itself up (.venv with pinned installs) on a fresh machine.
PY      := .venv/bin/python
BENCH   := .venv/bin/biflow-bench
SCALE   ?= small
SEED    ?= 0
ARGS    ?=
REPORT_OUT ?= reports
REPORT_ARGS ?=
# where records are read and written: `make reproduce-small RESULTS=runs/anew REPORT_OUT=runs/anew/reports
# BIFLOW_CACHE=runs/anew/cache` measures every table anew beside the committed records, which it leaves alone
RESULTS ?= results

ABLATIONS := ablation-main ablation-inverse-strategy ablation-denoise ablation-norm-control ablation-distance-metric \
             ablation-training-cfg ablation-one-nfe ablation-tarflow-vp ablation-tarflow-noise ablation-tarflow-depth \
             ablation-tarflow-guidance ablation-tarflow-coupling ablation-editing

.PHONY: setup test test-fast demo report reproduce-small reproduce-one-nfe reproduce-tarflow reproduce-editing clean \
        bench-speed g-study \
        rehearse-paper \
        $(ABLATIONS)

setup: .venv/.installed

.venv/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q tests

# the edit-test loop: everything but the end-to-end runs (marked slow), which `make test` (CI) keeps
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# the demo's records (results/tiny), cache (runs/cache) and report (runs/demo/reports) are all git-ignored: it
# leaves the tracked small-scale report alone and `git status` clean
# (REPORT_OUT on the command line, e.g. `make demo RESULTS=/tmp/r REPORT_OUT=/tmp/rep`, moves the report)
# It starts with `progress`: the variants it will run and, from an earlier demo's records, about how long they take.
demo: setup
	$(BENCH) progress --scale tiny --seeds $(SEED) --results-dir $(RESULTS) --estimate-from results
	$(MAKE) --no-print-directory $(ABLATIONS) bench-speed report SCALE=tiny REPORT_ARGS="--scales tiny" \
	  REPORT_OUT=$(if $(filter command line,$(origin REPORT_OUT)),$(REPORT_OUT),runs/demo/reports)

# a static pattern rule: make skips implicit rules for phony targets, so a plain `ablation-%:` would never run
$(ABLATIONS): ablation-%: setup
	$(BENCH) run $* --scale $(SCALE) --seed $(SEED) --results-dir $(RESULTS) $(ARGS)

# the small scale's speed table also times the compiled passes and both training steps (batch 128, per setting)
SPEED_ARGS_small := --compile --what all --train-batch-sizes 128 --train-settings fp32,bf16,bf16+compile
# the tiny scale checks that every sampler runs and is timed: two batch sizes, three timed calls each
SPEED_ARGS_tiny := --batch-sizes 1,64 --repeats 3
bench-speed: setup
	$(BENCH) bench speed --scale $(SCALE) --results-dir $(RESULTS) $(SPEED_ARGS_$(SCALE))

report: setup
	$(BENCH) report --results-dir $(RESULTS) --out $(REPORT_OUT) $(REPORT_ARGS)

# every ablation at each seed: seed 0 first, so a partial run already fills every table. A later seed trains a
# second G of each variant against the same F (stage1.seed) and draws other samples: the seed spread of each row.
# `progress` prints what is recorded and about how long the rest takes, before and after (and at any time); the
# committed records' wall times estimate the rows a run measuring anew (RESULTS) has yet to record.
SEEDS ?= 0 1
PROGRESS = $(BENCH) progress --scale small --results-dir $(RESULTS) --estimate-from results --seeds $(shell echo $(SEEDS) | tr ' ' ',')
# One job per (table, seed), two at a time, one thread each (on a 2-core CPU a one-thread job trains F as fast as a
# two-thread one): make starts the next job as soon as a core is free, so neither core idles while the other works
# through a longer list. Seed N+1 of a table follows its seed N (which trains the F they share); the rest runs in
# the listed order, longest tables first: the main table trains the shared F while norm control trains its
# unclipped one, and a model one job is training is waited for by the other, not trained twice.
REPRO_TABLES := main norm-control distance-metric training-cfg inverse-strategy denoise
REPRO_ARGS_norm-control := --variants none,clip
REPRO_JOBS := $(foreach s,$(SEEDS),$(foreach t,$(REPRO_TABLES),repro.$(t).$(s)))
SEED_PAIRS := $(join $(filter-out $(lastword $(SEEDS)),$(SEEDS)),$(addprefix :,$(wordlist 2,99,$(SEEDS))))
$(foreach t,$(REPRO_TABLES),$(foreach p,$(SEED_PAIRS),$(eval \
  repro.$(t).$(lastword $(subst :, ,$(p))): repro.$(t).$(firstword $(subst :, ,$(p))))))
.PHONY: repro-jobs $(REPRO_JOBS)

reproduce-small: setup
	$(PROGRESS)
	$(MAKE) --no-print-directory -j2 repro-jobs
	$(MAKE) --no-print-directory bench-speed report SCALE=small
	$(PROGRESS)

repro-jobs: $(REPRO_JOBS)
$(REPRO_JOBS): repro.%: setup
	OMP_NUM_THREADS=1 $(BENCH) run $(basename $*) --scale small --seed $(subst .,,$(suffix $*)) --results-dir $(RESULTS) $(REPRO_ARGS_$(basename $*))

# the paper scale's whole path at its real shapes (B/2 F and G, the VAE's and Inception's architectures) for a few
# steps on 2 CPU processes, before anyone spends a GPU hour: random VAE and Inception weights, named here alone
# (biflow_bench/rehearsal.py). On a GPU machine: the same command with --nproc_per_node = its GPUs.
REHEARSE_NPROC ?= 2
rehearse-paper: setup
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node $(REHEARSE_NPROC) -m biflow_bench \
	  rehearse --scale paper --random-weights vae,inception --out $(RESULTS)/rehearsal/paper.json

# the 1-NFE comparison (ablations/one-nfe.toml) at the small scale, both seeds, apart from reproduce-small: its
# BiFlow rows are main's (shared records), its peers train for BiFlow's FLOPs (`biflow-bench bench budget`)
# then each peer's quality against its training, scored at the checkpoints its seed-0 run kept (flow matching at 8
# Euler steps, the yardstick of its search), and flow matching's step study (its trained model, 1 to 64 steps)
PEER_CURVE = $(BENCH) bench curve peer --kept --w 0,1 --scale small --results-dir $(RESULTS) --variant
# The seeds run side by side (a table locks each seed apart), one job and one thread each.
ONE_NFE_JOBS := $(foreach s,$(SEEDS),one-nfe.$(s))
.PHONY: $(ONE_NFE_JOBS)
reproduce-one-nfe: setup
	$(MAKE) --no-print-directory -j2 $(ONE_NFE_JOBS)
	$(PEER_CURVE) one-nfe/meanflow-1
	$(PEER_CURVE) one-nfe/flow-matching-1 --set sample.steps=8
	$(BENCH) run flow-matching-steps --scale small --seed 0 --results-dir $(RESULTS)
$(ONE_NFE_JOBS): one-nfe.%: setup
	OMP_NUM_THREADS=1 $(BENCH) run one-nfe --scale small --seed $* --results-dir $(RESULTS)

# the editing table (ablations/editing.toml) at the small scale, both seeds: no training of its own, it edits with the
# main and inverse-strategy tables' F and Gs (trained here on a cold cache)
reproduce-editing: setup
	$(foreach s,$(SEEDS),$(BENCH) run editing --scale small --seed $(s) --results-dir $(RESULTS) &&) true

# TARFlow's own ablations (ablations/tarflow-*.toml) at the small scale, at SEED: every row trains its own F, on a third
# of the preset's F schedule (ablations/_tarflow.toml). Two one-thread jobs go through every table, one first to last,
# the other last to first (`--reverse`): each leaves to the other the row the other is measuring, so they meet
# wherever the work splits evenly, and an F that two rows share is trained once (the other job waits for it).
TARFLOW_TABLES := tarflow-noise tarflow-vp tarflow-depth tarflow-guidance tarflow-coupling
TARFLOW_JOBS := tarflow.forward tarflow.backward
TARFLOW_RUN = OMP_NUM_THREADS=1 $(BENCH) run $(1) --scale small --seed $(SEED) --results-dir $(RESULTS)
reverse = $(if $(1),$(call reverse,$(wordlist 2,$(words $(1)),$(1))) $(firstword $(1)))
.PHONY: $(TARFLOW_JOBS)
reproduce-tarflow: setup
	$(MAKE) --no-print-directory -j2 $(TARFLOW_JOBS)
	$(MAKE) --no-print-directory report
tarflow.forward: setup
	$(foreach t,$(TARFLOW_TABLES),$(call TARFLOW_RUN,$(t)) &&) true
tarflow.backward: setup
	$(foreach t,$(call reverse,$(TARFLOW_TABLES)),$(call TARFLOW_RUN,$(t)) --reverse &&) true

# the G study (ablations/g-training.toml): one point after another, each its own run, at the small scale by default
g-study: setup
	$(BENCH) run g-training --scale $(SCALE) --seed $(SEED) --results-dir $(RESULTS) $(ARGS)

clean:
	rm -rf .venv build *.egg-info
