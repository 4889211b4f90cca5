# Shortcuts for the scripts; each target is one documented command.
.PHONY: demo test fuzz soak bench

demo:  ## set up .venv and run the demo (the README quick start)
	scripts/demo

test:  ## every check CI runs (the README quick start)
	scripts/test

fuzz:  ## coverage-guided fuzzing of the decoders with atheris; FUZZ_SECONDS=60 by default
	fuzz/run.sh $(or $(FUZZ_SECONDS),60)

soak:  ## the adversarial suite at full size (1,000 guests x 100 commands; minutes)
	.venv/bin/pytest tests/adversarial --soak

bench: ## the benchmarks, side by side with their baselines
	.venv/bin/python -m benchmarks
