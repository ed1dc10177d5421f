# `make run` and `make test` do all the set-up on a fresh machine: they create .venv when it is
# missing and (re)install when requirements.txt or pyproject.toml changed.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
ARGS   ?=

.PHONY: run test test-all test-slow install tuxpaint noto clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu and not ddp" $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "(slow or ddp) and not gpu" $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(ARGS)

# Optional extra real data: ~950 TuxPaint stamps with captions (Debian package, GPL-2).
tuxpaint:
	apt-get install -y tuxpaint-stamps-default || (apt-get update && apt-get install -y tuxpaint-stamps-default)

# Optional shifted style: Google's Noto Color Emoji (Debian package, OFL 1.1), scored as data.shifts' noto.
noto:
	apt-get install -y fonts-noto-color-emoji || (apt-get update && apt-get install -y fonts-noto-color-emoji)

clean:
	rm -rf logs outputs multirun .pytest_cache
