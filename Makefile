# The course's commands. `make run` and `make test` set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   := data/FashionMNIST/raw/train-images-idx3-ubyte

.PHONY: setup data run test bench compare solutions lab clean

setup: $(STAMP) $(DATA)                      ## create .venv, install pinned packages, get the data

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(DATA): | $(STAMP)
	$(PY) tools/get_data.py

data: $(DATA)                                ## get Fashion-MNIST (offline from Debian's package if installed)

run: setup                                   ## execute every notebook headless into build/ and time each
	$(PY) tools/run_notebooks.py

test: setup                                  ## lint, unit tests, module/notebook sync, notebooks under nbval
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests --durations=15
	$(PY) -m pytest --nbval-lax --nbval-cell-timeout=600 --durations=10 notebooks

bench: setup                                 ## measure the round loop (W1, W2), DP's and secure aggregation's cost (JSON in benchmarks/)
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/bench_privacy.py
	$(PY) benchmarks/bench_secagg.py

compare: setup                               ## strategies x splits x seeds on Fashion-MNIST: table in build/compare (resumable)
	$(PY) -m fedrun compare --out build/compare

solutions: setup                             ## run each "change X" exercise headless and print the figures its solution quotes
	$(PY) tools/solutions.py

lab: setup                                   ## open the course in JupyterLab
	$(VENV)/bin/jupyter lab notebooks/

clean:                                       ## remove build outputs (keeps .venv and data)
	rm -rf build
