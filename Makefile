# The README's two set-up commands: `make demo` and `make test`.
# TORCH_SPEC picks the torch build (pip arguments): the default takes the CPU wheel kept on
# our CI machines' disk; elsewhere PyPI's Linux wheel is a CUDA build. CPU-only elsewhere:
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
# One stamp per TORCH_SPEC, so asking for another build reinstalls torch.
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH_SPEC)' | md5sum | cut -c1-8)

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/hpn-tune run --space search_spaces/default.yaml --trials 12 --max-concurrent 2 \
		--name demo-$$(date +%Y%m%d-%H%M%S) --set train.epochs=15

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .hpn_cache mlflow.db mlartifacts outputs
