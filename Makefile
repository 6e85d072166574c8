# biflow-bench: every target sets itself up (.venv with pinned installs) on a fresh machine.
PY      := .venv/bin/python
BENCH   := .venv/bin/biflow-bench
SCALE   ?= small
SEED    ?= 0
ARGS    ?=
REPORT_OUT ?= reports

ABLATIONS := ablation-inverse-strategy ablation-denoise ablation-norm-control ablation-distance-metric \
             ablation-training-cfg ablation-main

.PHONY: setup test demo report reproduce-small clean bench-speed second-seed $(ABLATIONS)

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

bench-speed: setup
	$(BENCH) bench speed --scale $(SCALE)

report: setup
	$(BENCH) report --out $(REPORT_OUT)

# seed 1 of the BiFlow baseline of the tables that vary G: the seed spread beside each run's bootstrap std
second-seed: setup
	$(BENCH) run inverse-strategy --variants hidden-align --scale $(SCALE) --seed 1
	$(BENCH) run denoise --variants learned --scale $(SCALE) --seed 1
	$(BENCH) run norm-control --variants clip --scale $(SCALE) --seed 1
	$(BENCH) run distance-metric --variants mse --scale $(SCALE) --seed 1

reproduce-small: setup
	$(MAKE) --no-print-directory $(ABLATIONS) bench-speed second-seed report SCALE=small

clean:
	rm -rf .venv build *.egg-info
