# Two commands do everything on a fresh machine:  make run  (the main job)  and  make test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED_BUILDER := ../shared/datasets/make_cifar10.py
LOCAL_DATA := .cache/cifar10
# CIFAR10_DIR: a local cifar-10-batches-py folder or cifar-10-python.tar.gz. Unset, `make run`
# builds one from ../shared/datasets when that exists (machines without internet), else downloads.
ifeq ($(strip $(CIFAR10_DIR)),)
ifneq ($(wildcard $(SHARED_BUILDER)),)
export CIFAR10_DIR := $(LOCAL_DATA)/cifar-10-batches-py
DATA_DEP := $(LOCAL_DATA)/cifar-10-batches-py/test_batch
endif
endif

# The bf16 extra (MKL and oneDNN, for precision = "bf16" / "auto") where the CPU has bf16 instructions.
BF16_EXTRA := $(shell grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo ,bf16)

.PHONY: run test install data bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,postgres,dashboard,grpc$(BF16_EXTRA)]'
	touch $@

install: $(VENV)/.installed

$(LOCAL_DATA)/cifar-10-batches-py/test_batch: | $(VENV)/.installed
	$(PY) $(SHARED_BUILDER) $(LOCAL_DATA) --archive

data: $(VENV)/.installed $(DATA_DEP)

run: data
	$(PY) scripts/pipeline.py $(ARGS)

test: data
	$(PY) -m pytest $(PYTEST_ARGS)

bench: data
	$(PY) scripts/bench.py $(ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
