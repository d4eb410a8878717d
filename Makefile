# Two commands on a fresh clone:  `make demo` (set up + run the main job)  and  `make test`.
# torch 2.13.0 is installed FIRST from the machine's local CPU wheel; installing the project before it
# would make pip resolve `torch` from PyPI and pull several GB of CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moetune-installed
TORCH  ?= torch==2.13.0

.PHONY: setup sysdeps demo test lint clean gpu-check gpu-wheels gpu-smoke FORCE

setup: $(STAMP)

# Debian packages the *tests* read, installed when missing (as root with apt-get; else a warning and those tests
# skip): fortunes (real English text for the distillation tests, model/distill/text.py) and postgresql (a
# throwaway cluster for the many-worker and PostgreSQL DB tests). `make demo` needs neither.
sysdeps:
	@missing=""; \
	test -d /usr/share/games/fortunes || missing="$$missing fortunes"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages for the tests:$$missing"; \
	    apt-get install -y -q $$missing >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null); \
	  else echo "warning: missing Debian packages:$$missing (apt-get install$$missing); the tests that need them skip"; fi; \
	fi

# The editable install is "strict": a tree of links to the sources under build/, on sys.path through a .pth
# file. Static tools (mypy, pyright, IDEs) follow it, which they cannot do with setuptools' default import hook
# (the folders are mapped onto moetune.<folder>). Edits show at once; a new or removed .py file needs a
# re-link, so the stamp also depends on the list of source files.
SOURCES := $(VENV)/.moetune-sources
$(SOURCES): FORCE
	@mkdir -p $(VENV); find autotune ir kernels model schedules -name '*.py' | LC_ALL=C sort > $@.new; \
	if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(STAMP): pyproject.toml $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[hf,dev]" --config-settings editable_mode=strict
	touch $(STAMP)

FORCE:

demo: $(STAMP)
	$(VENV)/bin/moetune targets
	$(VENV)/bin/moetune tune --model qwen3-30b-a3b --dtype float32 --m 1,16,256 --trials 24 --time-budget 6m
	$(VENV)/bin/moetune bench --preset qwen3-30b-a3b --tokens 1,16,256 --providers reference,hf-eager,hf-grouped_mm,tvm,tuned

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: sysdeps $(STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# On a machine with a CUDA GPU: the GPU-marked tests, a bf16 tune of two presets for this GPU (device-side timing,
# winners under `cuda -arch=sm_XY -device=<gpu>`), then the GPU bench with its roofline; all under results/<gpu>/.
GPU_PRESETS ?= qwen3-30b-a3b mixtral-8x7b
GPU_M ?= 1,16,256,1024,4096
GPU_TUNE_BUDGET ?= 10m
gpu-check: $(STAMP)
	$(PY) -m pip install -q -e ".[cuda]"
	$(PY) -m pytest -q -m gpu tests/test_gpu.py
	set -e; gpu=$$($(PY) -c "from moetune.autotune.measure import machine_name; print(machine_name('cuda'))"); \
	mkdir -p results/$$gpu/tune; \
	for model in $(GPU_PRESETS); do \
	  $(VENV)/bin/moetune tune --model $$model --dtype bfloat16 --target cuda --m $(GPU_M) \
	    --time-budget $(GPU_TUNE_BUDGET) --json > results/$$gpu/tune/tune_$$model.json; \
	done; \
	$(VENV)/bin/moetune bench --target cuda $(addprefix -p ,$(GPU_PRESETS)) --tokens $(GPU_M) \
	  --providers reference,hf-eager,hf-grouped_mm,torch,triton,tvm_cuda,tuned --save \
	  --report results/$$gpu/bench_report.json --plot results/$$gpu/bench_plots

# The GPU machine lent to a session (one H200: torch, Triton, CuPy, no TVM/Optuna/SQLAlchemy, no network): build
# the wheels it lacks here, carry .whl/ there, run `make gpu-smoke` in one call. DRY=1 runs the same steps here on
# Triton's interpreter. See .ci/gpu-smoke.
GPU_WHEELS = optuna sqlalchemy alembic mako colorlog cmaes
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$($(PY) -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in '$(GPU_WHEELS)'.split()))")
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl .
	ls .whl

gpu-smoke:
	DRY=$(DRY) PY=$(if $(filter 1,$(DRY)),$(PY),python3) bash .ci/gpu-smoke

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
