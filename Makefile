# Shortcuts for the scripts; each sets up .venv and builds on first use.
.PHONY: test bench bench-quick build info gpu-check gpu-check-dry clean
test:
	bash scripts/test.sh
bench:
	bash scripts/bench.sh
bench-quick:
	bash scripts/bench.sh --quick
build:
	bash scripts/env.sh
info: build
	.venv/bin/python -m fastlm info
gpu-check:  # on a GPU machine: make gpu-check OUT=dir BUDGET=seconds
	bash scripts/gpu_check.sh $(or $(OUT),gpu-check-out) --budget $(or $(BUDGET),780)
gpu-check-dry: build
	PYTHON=.venv/bin/python bash scripts/gpu_check.sh $(or $(OUT),gpu-check-out) --budget $(or $(BUDGET),600) --dry-run
clean:
	rm -rf build fastlm/*.so fastlm/_C*.so *.egg-info
