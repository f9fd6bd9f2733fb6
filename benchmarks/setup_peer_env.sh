#!/usr/bin/env bash
# The virtualenv for benchmarks/retro_vs_gpt.py part 2: lucidrains' retro-pytorch 0.3.9.
# It imports faiss/autofaiss, which need numpy 1.x and pyarrow<20, so it cannot share this
# project's numpy-2 environment. torch comes from the same local wheel as the project's.
#
#   bash benchmarks/setup_peer_env.sh [VENV_DIR]      (default /tmp/peer-venv)
set -euo pipefail
venv="${1:-/tmp/peer-venv}"
python -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0 'numpy<2' 'pyarrow<20' retro-pytorch==0.3.9
"$venv/bin/python" -c "import retro_pytorch, numpy; print('retro-pytorch ready in $venv, numpy', numpy.__version__)"
