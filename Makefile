# Two commands a new user needs: `make demo` and `make test`.
# Each creates .venv if missing, installs the pinned dependencies and the data, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nni-fedexit-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install data browser demo test test-fast mutation docs clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[flower,onnx,test,docs]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package where apt-get and root are there;
# elsewhere pass --data-dir (or download=True) as the README says.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not installed and apt-get/root not available: see README, 'Data'."; \
	fi

# Debian's chromium and chromium-driver for the web UI test (tests/test_view.py) and openssh-client's
# ssh-keygen for the SuperNode keys (tests/test_flower.py), where apt-get and root are there; elsewhere
# those tests are skipped and say why (with CI=true a skip is a failure).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1; then \
	  echo "chromium: $$(command -v chromium), ssh-keygen: $$(command -v ssh-keygen)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver openssh-client; \
	else \
	  echo "chromium/chromedriver/ssh-keygen not installed and apt-get/root not available: the browser and SuperNode-key tests are skipped."; \
	fi

demo: install data
	$(VENV)/bin/nni-fedexit run examples/fmnist_quickstart.yaml --resume

test: install data browser
	$(PY) -m pytest -q

# The quick loop while changing code: every test not marked slow (no NNI experiment, Flower or Ray
# process, browser or docs build); `make test` (what CI runs) runs them all.
test-fast: install data
	$(PY) -m pytest -q -m "not slow"

# Mutation testing of the core (not part of `make test`): one mutmut shard per module, results in
# benchmarks/results/mutation.json; docs/testing.md says what it covers and how long it takes.
mutation: install data
	$(PY) -m pip install --quiet -e '.[mutation]'
	$(PY) benchmarks/mutation.py

# The documentation site (mkdocs.yml, docs/) built into site/; open site/index.html.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
