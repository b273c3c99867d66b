# Developer shortcuts. The README commands are the contract; these are conveniences.
PY ?= python3

.PHONY: install compile debug test bench bench-micro clean

install:            ## editable install with test and bench extras (builds the core in place)
	$(PY) -m pip install -e '.[test,bench]'

compile:            ## rebuild fastgate/_core after editing _core.pyx
	$(PY) setup.py build_ext --inplace

debug:              ## core with annotate + linetrace (fastgate/_core.html shows C per line)
	FASTGATE_DEBUG=1 $(PY) setup.py build_ext --inplace --force

test:               ## the README test command, minus the install
	$(PY) -m pytest

bench:              ## the side-by-side suite (see bench/README.md for subsets)
	$(PY) -m bench

bench-micro:        ## core micro-benchmarks
	$(PY) -m pytest bench/micro --benchmark-only

clean:
	rm -rf build fastgate/_core.c fastgate/_core.html fastgate/_http.c fastgate/_http.html fastgate/*.so .pytest_cache .hypothesis
