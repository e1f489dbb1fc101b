# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_DATA := datasets/reconpatch_demo

.PHONY: venv weights demo test lint

$(INSTALLED): setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(INSTALLED)

venv: $(INSTALLED)

weights: venv
	$(BIN)/reconpatch weights

demo: weights
	$(BIN)/reconpatch demo-data $(DEMO_DATA)
	$(BIN)/anomalib train --config configs/reconpatch.yaml
	$(BIN)/reconpatch compare --data configs/data/demo.yaml --out results/compare/demo
	$(BIN)/anomalib export --model ReConPatch --model.backbone tf_efficientnet_lite0 \
		--model.layers "[blocks.2, blocks.4]" --export_type openvino --export_root results/export/demo \
		--ckpt_path results/ReConPatch/MVTecAD/brick/latest/weights/lightning/model.ckpt
	$(BIN)/reconpatch predict --model results/export/demo/weights/openvino/model.xml \
		--input $(DEMO_DATA)/brick/test --out results/predict/demo

test: venv
	$(BIN)/python -m pytest -ra

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
