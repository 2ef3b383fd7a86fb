# `make demo` and `make test` work on a fresh machine: they build .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch 2.13.0 (CPU) installs from the local wheel cache in seconds; pinning it
# keeps pip from fetching a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= demo_checkpoint
# make demo's fine-tuning step: the adapter, the merged checkpoint, and the short run's settings
# (the tiny random model learns its identity when lm_head trains beside the LoRA layers).
DEMO_LORA ?= build/demo_lora
DEMO_TUNED ?= build/demo_tuned
DEMO_LORA_ARGS ?= --max_steps 100 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
	--learning_rate 1e-2 --warmup_steps 3 --model_max_length 64 --save_strategy no --logging_steps 10 \
	--lora_dropout 0 --lora_modules_to_save lm_head --disable_tqdm True

.PHONY: venv demo chat test test-e2e test-finetune test-gptq clean

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
	@echo "--- LoRA fine-tuning of the tiny chat checkpoint on a bundled identity dataset (a minute or two on CPU) ---"
	PATH="$(abspath $(VENV))/bin:$$PATH" bash finetune/finetune_lora_single_gpu.sh -m $(DEMO_DIR) \
		-d qwen/finetune/identity_demo.json -o $(DEMO_LORA) -- $(DEMO_LORA_ARGS)
	$(PY) -m qwen.tools.merge_lora $(DEMO_LORA) $(DEMO_TUNED) --force
	@echo "--- chatting with the merged checkpoint ---"
	printf ':conf do_sample=False\nWho are you?\n你是谁？\n:q\n' \
		| $(PY) cli_demo.py -c $(DEMO_TUNED) --cpu-only --max-new-tokens 24

# Interactive terminal chat with the tiny checkpoint.
chat: venv
	$(PY) -m qwen.tools.tiny_checkpoint $(DEMO_DIR) --chat --force
	$(PY) cli_demo.py -c $(DEMO_DIR) --cpu-only --max-new-tokens 32

test: venv
	$(PY) -m pytest -q --ignore=tests/e2e --ignore=tests/gptq

# The server end to end under load (tests/e2e: a real server process, 32 concurrent streams, RSS over
# 300 requests, dropped clients); a few minutes, so not part of `make test`.
test-e2e: venv
	$(PY) -m pytest -q tests/e2e --ignore=tests/e2e/test_finetune_launchers.py

# Fine-tuning through the real launcher scripts (finetune/*.sh) on CPU: LoRA on DeepSpeed ZeRO-2 and full
# fine-tuning on ZeRO-3 with 2 processes each, the single-process script, resuming; a few minutes.
test-finetune: venv
	$(PIP) install -q -e ".[finetune]"
	$(PY) -m pytest -q tests/e2e/test_finetune_launchers.py

# run_gptq.py with the real gptqmodel on CPU. gptqmodel needs torch>=2.14.1 (a CUDA build on local
# disk, ~6 GB, that runs on the CPU), so these tests get their own virtualenv.
GPTQ_VENV ?= .venv-gptq
$(GPTQ_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/pip install -q --upgrade pip
	$(GPTQ_VENV)/bin/pip install -q torch==2.14.1
	$(GPTQ_VENV)/bin/pip install -q --no-build-isolation "gptqmodel==7.7.0"
	$(GPTQ_VENV)/bin/pip install -q -e ".[gptq]" pytest dashscope
	touch $@

test-gptq: $(GPTQ_VENV)/.installed
	GPTQMODEL_CPU_WORKERS=2 $(GPTQ_VENV)/bin/python -m pytest -q tests/gptq

clean:
	rm -rf $(VENV) $(GPTQ_VENV) $(DEMO_DIR) $(DEMO_LORA) $(DEMO_TUNED) .pytest_cache
