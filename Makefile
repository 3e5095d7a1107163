# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install requirements.txt first (quick when already done).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# What `make demo` runs on. The defaults are what a user online wants: COCO,
# a downloaded subset of images, InceptionV3 with Keras's ImageNet weights.
# Offline, point them at local files, e.g.
#   make demo DATASET=flickr8k DATA_DIR=/data/flickr8k DOWNLOAD=0 ENCODER=mobilenet_v2 WEIGHTS=/w/mobilenet.weights.h5
DATASET ?= coco
DATA_DIR ?= data/coco
WORK_DIR ?= data/work
ENCODER ?= inception_v3
WEIGHTS ?= imagenet
DOWNLOAD ?= 1
# SUBSET: how many COCO images to download; unset, the package default (captioning.download.SUBSET_SIZE).
SUBSET ?=
RUNS ?= runs
# `make test` runs the suite on this many processes (pytest-xdist); 1 runs it in one.
TEST_WORKERS ?= 2
# Where COCO is downloaded from: the official server or a mirror with its layout
# (a proxy, a class's own copy). The environment variable CAPTIONING_COCO_URL works too.
COCO_URL ?= $(or $(CAPTIONING_COCO_URL),http://images.cocodataset.org)
# Run only some notebooks (NOTEBOOKS=01,02), or change their parameters
# (PARAMS="epochs=4 experiment_epochs=3": NAME=VALUE pairs, no spaces in a value).
NOTEBOOKS ?=
PARAMS ?=
# SOLUTIONS=1: after the notebooks, run the exercises' solutions (notebooks/solutions/), which check
# every answer against the package. `make solutions` runs only them, on what `make demo` left.
SOLUTIONS ?=

.PHONY: help setup demo solutions test lab data benchmarks clean clean-data

help:
	@echo "make demo        run notebooks 01-06 end to end; executed copies land in $(RUNS)/"
	@echo "make solutions   run the exercises' solutions on what make demo left (same settings)"
	@echo "make test        run the test suite"
	@echo "make lab         open the notebooks in JupyterLab"
	@echo "make data        download COCO caption annotations and a subset of its images into $(DATA_DIR)"
	@echo "make benchmarks  run every benchmark in benchmarks/"
	@echo "make clean       remove executed notebooks and caches (keeps data/ downloads)"
	@echo "make clean-data  remove everything under data/ but its README"

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --editable .
	@touch $@

NOTEBOOK_SETTINGS = --out $(RUNS) --dataset $(DATASET) --data-dir $(DATA_DIR) --work-dir $(WORK_DIR) \
	--encoder $(ENCODER) --weights $(WEIGHTS) --download $(DOWNLOAD) $(if $(SUBSET),--subset-size $(SUBSET)) \
	$(if $(NOTEBOOKS),--only $(NOTEBOOKS)) $(foreach pair,$(PARAMS),-p $(subst =, ,$(pair)))

demo: setup
	@CAPTIONING_COCO_URL=$(COCO_URL) $(PY) scripts/run_notebooks.py $(NOTEBOOK_SETTINGS) \
		$(if $(filter 1,$(SOLUTIONS)),--solutions)

solutions: setup
	@CAPTIONING_COCO_URL=$(COCO_URL) $(PY) scripts/run_notebooks.py $(NOTEBOOK_SETTINGS) --solutions-only

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder tests

lab: setup
	$(VENV)/bin/jupyter lab notebooks

data: setup
	$(PY) -m captioning.download --data-dir $(DATA_DIR) $(if $(SUBSET),--subset-size $(SUBSET)) --base-url $(COCO_URL)

benchmarks: setup
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(RUNS) .pytest_cache $(WORK_DIR)
	find . -name __pycache__ -prune -exec rm -rf {} +

clean-data:
	find data -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
