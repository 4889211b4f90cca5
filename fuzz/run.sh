#!/usr/bin/env bash
# Coverage-guided fuzzing of the v1 decoders with atheris (optional; not part of CI).
#   fuzz/run.sh            run for 60 s
#   fuzz/run.sh 600        run for 600 s
#   fuzz/run.sh 60 -jobs=2 extra libFuzzer flags after the duration
# Crashing inputs are written to fuzz/artifacts/; the corpus grows in fuzz/corpus/.
set -euo pipefail
cd "$(dirname "$0")/.."
export VSOCK_ASYNC_FORBID_VSOCK_CONNECT=1
seconds="${1:-60}"
shift || true
py=.venv/bin/python
"$py" -c "import atheris" 2>/dev/null || "$py" -m pip install --quiet "atheris>=2.3"
mkdir -p fuzz/corpus fuzz/artifacts
exec "$py" fuzz/fuzz_decoders.py -max_total_time="$seconds" -artifact_prefix=fuzz/artifacts/ \
    "$@" fuzz/corpus
