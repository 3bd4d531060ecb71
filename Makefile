# Two commands on a fresh machine with only python3 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo demo-refresh demo-discovery test lint bench clean lock

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,export,s3]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crawler run configs/demo.yaml
	$(BIN)/crawler status configs/demo.yaml

# sources: sellers' listings and a category list find the products, then their reviews are walked
demo-discovery: $(STAMP)
	$(BIN)/crawler run --fresh configs/discovery.yaml
	$(BIN)/crawler status configs/discovery.yaml

# a refresh for real: the sandbox in its own process grows between the harvest and the refresh
demo-refresh: $(STAMP)
	@$(BIN)/crawler sandbox --port 8700 > /dev/null & pid=$$!; trap "kill $$pid" EXIT; \
	export SANDBOX_KEY=sk_demo; sleep 1; \
	$(BIN)/crawler run --fresh configs/refresh-demo.yaml && \
	$(BIN)/python -c "import urllib.request as u; print(u.urlopen(u.Request('http://127.0.0.1:8700/_sandbox/grow', method='POST')).read().decode())" && \
	$(BIN)/crawler plan --refresh configs/refresh-demo.yaml && \
	$(BIN)/crawler run --refresh configs/refresh-demo.yaml && \
	$(BIN)/crawler status configs/refresh-demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check crawler tests bench
	$(BIN)/ruff format --check crawler tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,export,s3,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py

# refresh the pins after changing pyproject.toml's ranges
lock:
	rm -rf /tmp/crawler-lock && $(PYTHON) -m venv /tmp/crawler-lock
	/tmp/crawler-lock/bin/pip install --quiet -e '.[dev,export,s3,bench]'
	/tmp/crawler-lock/bin/pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) out
