# Two commands on a fresh machine:
#   make demo   installs into .venv (once), then prunes resnet20 on the embedded digits data with OBA
#   make test   installs into .venv (once), then runs the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo grid-demo test test-all bench bench-imagenet install clean

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train_prune.py --importance_type OBA --dataset digits --model resnet20 \
		--num_epochs 10 --lr 0.05 --milestones 5 7 --batch_size 64 \
		--sl_num_epochs 3 --sl_lr 0.01 --sl_weight_decay 5e-4 \
		--ops_ratios 0.5 --iterative_steps 8 --iters_per_step 4 --bn_recalibration_batches 8 \
		--output_dir outputs/demo --save_path_prefix checkpoints/demo

# criteria x targets x seeds on digits: results.csv, table.md and plots in outputs/grid_demo
grid-demo: $(STAMP)
	$(PY) compare.py --dataset digits --model resnet20 --criteria OBA Kron-OBS Eigen Taylor Weight \
		--targets 0.5 0.3 --seeds 0 1 --jobs 2 --output_dir outputs/grid_demo -- \
		--num_epochs 10 --lr 0.05 --batch_size 64 --sl_num_epochs 2 --sl_lr 0.01 --sl_milestones 1 \
		--iterative_steps 4 --iters_per_step 2 --bn_recalibration_batches 4 --no-tensorboard

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/importance_cost.py

# GPU: fine-tuning images/s and batch-64 latency, dense vs pruned resnet50 / vit_b_16 at 224 px
bench-imagenet: $(STAMP)
	$(PY) bench/imagenet_throughput.py --device cuda

clean:
	rm -rf outputs checkpoints runs .pytest_cache
