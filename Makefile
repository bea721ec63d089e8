# Every target works on a fresh clone with nothing but python3 and make.
PYTHON ?= python3
VENV   ?= .venv
# torch, torchvision and ray are installed first, pinned to the versions tested here (pip takes these
# torch builds from this machine's disk). Override on other hosts, e.g.
# `make TORCH="torch==2.11.0 torchvision==0.26.0"`.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
RAY    ?= ray[data,train,default]==2.60.0
STAMP  := $(VENV)/.segpipe-installed
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q --disable-pip-version-check
DEMO   ?= demo-out
# Headless Chromium opens report.html in the tests (Debian's package; installed once, when missing).
CHROMIUM ?= /usr/bin/chromium

.PHONY: venv test demo clean chromium

venv: $(STAMP)

# Rebuilt whenever the dependencies may have changed. .ci/constraints.txt pins the versions tested
# together: without it pip backtracks for many minutes between s3fs's botocore and moto's boto3.
$(STAMP): pyproject.toml Makefile .ci/constraints.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -c .ci/constraints.txt $(TORCH) '$(RAY)'
	$(PIP) -c .ci/constraints.txt -e '.[dev]'
	$(PIP) -c .ci/constraints.txt --no-deps tidecv
	touch $(STAMP)

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q -p no:cacheprovider

chromium: $(CHROMIUM)

# Only when the browser is missing: apt-get as root, else through sudo.
$(CHROMIUM):
	$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q
	$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q chromium

# The main job end to end (`segpipe demo`): synthesise, validate, train the built-in model briefly on Ray Train, label
# the validation split with it, evaluate PQ and AP, one data-engine round, the report; a table of each step's
# seconds, result and outputs at the end. 3.5 minutes on 2 cores, 10 beside other work (README: Start here).
demo: $(STAMP)
	$(BIN)/segpipe demo --out $(DEMO) --force

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(DEMO)
