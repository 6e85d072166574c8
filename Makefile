# biflow-bench: every target sets itself up (.venv with pinned installs) on a fresh machine.
PY      := .venv/bin/python
BENCH   := .venv/bin/biflow-bench
SCALE   ?= small
SEED    ?= 0
ARGS    ?=
REPORT_OUT ?= reports

ABLATIONS := ablation-main ablation-inverse-strategy ablation-denoise ablation-norm-control ablation-distance-metric \
             ablation-training-cfg

.PHONY: setup test demo report reproduce-small lane-a lane-b clean bench-speed $(ABLATIONS)

setup: .venv/.installed

.venv/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q tests

# the demo's records (results/tiny), cache (runs/cache) and report (runs/demo/reports) are all git-ignored: it
# leaves the tracked small-scale report alone and `git status` clean
demo: setup
	$(MAKE) --no-print-directory $(ABLATIONS) bench-speed report SCALE=tiny REPORT_OUT=runs/demo/reports

# a static pattern rule: make skips implicit rules for phony targets, so a plain `ablation-%:` would never run
$(ABLATIONS): ablation-%: setup
	$(BENCH) run $* --scale $(SCALE) --seed $(SEED) $(ARGS)

# the small scale's speed table also times the compiled passes and both training steps (batch 128, per setting)
SPEED_ARGS_small := --compile --what all --train-batch-sizes 128 --train-settings fp32,bf16,bf16+compile
bench-speed: setup
	$(BENCH) bench speed --scale $(SCALE) $(SPEED_ARGS_$(SCALE))

report: setup
	$(BENCH) report --out $(REPORT_OUT)

# every ablation at each seed: seed 0 first, so a partial run already fills every table. A later seed trains a
# second G of each variant against the same F (stage1.seed) and draws other samples: the seed spread of each row.
# `progress` prints what is recorded and about how long the rest takes, before and after (and at any time).
SEEDS ?= 0 1
PROGRESS = $(BENCH) progress --scale small --seeds $(shell echo $(SEEDS) | tr ' ' ',')
# The tables run in two lanes side by side, one thread each (on a 2-core CPU a one-thread job trains F as fast as
# a two-thread one), each lane through every seed without waiting for the other: each table holds its own results
# lock, and a model one lane is training is waited for by the other, not trained twice. Lane b starts with norm
# control's unclipped F while lane a trains the shared F.
reproduce-small: setup
	$(PROGRESS)
	$(MAKE) --no-print-directory -j2 lane-a lane-b SCALE=small
	$(MAKE) --no-print-directory bench-speed report SCALE=small
	$(PROGRESS)

lane-a: setup
	for seed in $(SEEDS); do OMP_NUM_THREADS=1 $(MAKE) --no-print-directory SEED=$$seed ablation-main \
	  ablation-inverse-strategy ablation-denoise || exit 1; done
lane-b: setup
	for seed in $(SEEDS); do OMP_NUM_THREADS=1 $(MAKE) --no-print-directory SEED=$$seed ablation-norm-control \
	  ARGS="--variants none,clip" && OMP_NUM_THREADS=1 $(MAKE) --no-print-directory SEED=$$seed \
	  ablation-distance-metric ablation-training-cfg || exit 1; done

clean:
	rm -rf .venv build *.egg-info
