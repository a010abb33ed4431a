# Shortcuts for the scripts; each sets up .venv and builds on first use.
.PHONY: test bench bench-quick build info gpu-check clean
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
gpu-check:
	bash scripts/gpu_check.sh $(or $(OUT),gpu-check-out)
clean:
	rm -rf build fastlm/*.so fastlm/_C*.so *.egg-info
