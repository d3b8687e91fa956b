# `make demo` and `make test` work from a fresh clone: they create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# the Ray the tests ran on; pyproject.toml accepts >=2.56,<3 (a cluster's Ray decides)
RAY_PIN := ray[default,train,tune]==2.60.0
DEMO_OUT ?= runs/demo

.PHONY: setup demo test clean mutate

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) '$(RAY_PIN)'
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/dml.py --students 4 --dataset digits --epochs 5 --output $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs

# Mutation testing of cohort/losses.py, cohort/runs.py and cohort/student.py with the fast
# unit tests only (config: [tool.mutmut] in pyproject.toml); 2 workers, a fresh run each
# time. Prints every surviving mutant and the score per module; `.venv/bin/mutmut show NAME`
# prints one mutant's diff.
mutate: $(STAMP)
	$(PY) -m pip install -q -e '.[mutate]'
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2
	@$(VENV)/bin/mutmut results
	@$(VENV)/bin/mutmut results --all true | $(PY) -c "$$MUTATION_SCORE"

define MUTATION_SCORE
import collections, sys
counts = collections.defaultdict(collections.Counter)
for line in sys.stdin:
    name, sep, status = line.strip().rpartition(': ')
    if sep and '__mutmut_' in name:
        counts[name.split('.')[1]][status] += 1
total = collections.Counter()
for module, c in sorted(counts.items()):
    total.update(c)
    n = sum(c.values())
    print(f"{module:8s} {n:4d} mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
          + f"; score {100.0 * c['killed'] / n:.1f}%")
n = sum(total.values())
print(f"mutation score: {total['killed']}/{n} killed = {100.0 * total['killed'] / max(n, 1):.1f}%")
endef
export MUTATION_SCORE
