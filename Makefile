# `make demo` and `make test` work on a fresh machine: they build .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch 2.13.0 (CPU) installs from the local wheel cache in seconds; pinning it
# keeps pip from fetching a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= demo_checkpoint

.PHONY: venv demo chat test test-e2e clean

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -r requirements.txt -e ".[test,api,structured]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m qwen.tools.tiny_checkpoint $(DEMO_DIR) --chat --force
	$(PY) -m qwen.tools.demo $(DEMO_DIR)
	@echo "--- the same conversation through cli_demo.py (scripted input) ---"
	printf ':conf do_sample=False\n你好\nTell me a story about a young entrepreneur.\n:his\n:q\n' \
		| $(PY) cli_demo.py -c $(DEMO_DIR) --cpu-only --max-new-tokens 24

# Interactive terminal chat with the tiny checkpoint.
chat: venv
	$(PY) -m qwen.tools.tiny_checkpoint $(DEMO_DIR) --chat --force
	$(PY) cli_demo.py -c $(DEMO_DIR) --cpu-only --max-new-tokens 32

test: venv
	$(PY) -m pytest -q --ignore=tests/e2e

# The server end to end under load (tests/e2e: a real server process, 32 concurrent streams, RSS over
# 300 requests, dropped clients); a few minutes, so not part of `make test`.
test-e2e: venv
	$(PY) -m pytest -q tests/e2e

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
