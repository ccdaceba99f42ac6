# Two entry points for a fresh machine (see README):
#   make demo   create .venv, install what `lifelong-moe run` needs (no extras), run both quickstarts on the
#               embedded default (CLIP toy MTIL, then continual VQA on the tiny VLM)
#   make test   create .venv, install with the test, ray and tracking extras, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: demo test install install-test clean-venv

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e '.[test,ray,tracking]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/lifelong-moe run configs/quickstart.yaml --overwrite
	$(VENV)/bin/lifelong-moe run configs/vqa_quickstart.yaml --overwrite

test: install-test
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
