# Reliability targets (issue 7). The Makefile includes this file: `include mk/reliability.mk`.
#   make fuzz                     1,000,000 inputs per protocol against the sans-I/O parsers
#   make fuzz FUZZ_INPUTS=50000   a shorter run
#   make soak                     30 minutes of mixed load (RSS, fds, errors), then 20 SIGKILL rounds
#   make soak SOAK_MINUTES=5
FUZZ_INPUTS  ?= 1000000
SOAK_MINUTES ?= 30
CRASH_ROUNDS ?= 20

.PHONY: fuzz soak crash

fuzz: $(STAMP)
	$(BIN)/python bench/fuzz.py --inputs $(FUZZ_INPUTS)

soak: $(STAMP)
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES)
	POSTFACH_CRASH_ROUNDS=$(CRASH_ROUNDS) $(BIN)/pytest -p no:cacheprovider -q tests/reliability/test_crash.py

## The crash-safety test with the full number of SIGKILL rounds (make test runs 3).
crash: $(STAMP)
	POSTFACH_CRASH_ROUNDS=$(CRASH_ROUNDS) $(BIN)/pytest -p no:cacheprovider -q tests/reliability/test_crash.py
