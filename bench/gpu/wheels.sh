#!/usr/bin/env bash
# The Python packages this project needs that the GPU device image lacks, as wheels for its Python 3.12
# (x86-64 manylinux) in .whl/ (git-ignored), which bench/gpu/run.py installs with `pip --no-index` there:
# the machine has no network. Everything that travels to it (working tree + wheels) must stay under 64 MiB,
# so this fails when the total would not.
#
#   bash bench/gpu/wheels.sh            # download / build what is missing, then check the size
#   PY=python3 bash bench/gpu/wheels.sh # another Python for pip (any version: it downloads for 3.12)
#
# Versions are the ones the CPU test suite runs with (.venv). Left out on purpose:
# - wandb: its wheel and its needs (opentelemetry-*, platformdirs, cwevals) are large, and the bench runs
#   with wandb.mode=disabled, which never imports it (pretrain/logging.py imports it only when enabled).
# - everything the image already has (bench/NOTES.md lists what was checked against which image).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
DEST=${DEST:-.whl}
LIMIT_MIB=${LIMIT_MIB:-64}
DEEPSPEED=0.19.8
BINARY=(
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "zstandard==0.25.0" "hjson==3.1.0"
  "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
  "typing-extensions==4.16.0"  # pydantic needs >= 4.16; the image's version is not on record
)
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
mkdir -p "$DEST"

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"

# DeepSpeed is published as a source distribution only. Built with DS_BUILD_OPS=0 it is a pure-Python
# wheel (py3-none-any): no compiled ops inside, so it does not depend on the torch or CUDA it was built
# against; an op that is needed is JIT-built at first use (ninja and nvcc are on the image). Our engine
# passes torch's AdamW, so DeepSpeed builds no optimizer op.
if ! ls "$DEST"/deepspeed-"$DEEPSPEED"-py3-none-any.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$DEEPSPEED"
fi

# One version of each package, or `pip install` there refuses the whole set.
expected=$(printf '%s\n' "${BINARY[@]}" "deepspeed==$DEEPSPEED" | sed 's/==.*//; s/-/_/g' | tr 'A-Z' 'a-z' | sort)
found=$(ls "$DEST"/*.whl | xargs -n1 basename | sed 's/-.*//' | tr 'A-Z' 'a-z' | sort)
extra=$(comm -13 <(echo "$expected" | sort -u) <(echo "$found"))
dupes=$(echo "$found" | uniq -d)
if [ -n "$extra$dupes" ]; then
  echo "error: $DEST holds wheels not in this recipe or two versions of one package: ${extra} ${dupes}" >&2
  echo "       remove them (ls $DEST) and run this again" >&2
  exit 1
fi

# The set installs as bench/gpu/run.py installs it there (tags checked for CPython 3.12, x86-64 Linux).
check=$(mktemp -d)
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$check" --only-binary=:all: \
  --python-version 3.12 --implementation cp "${PLATFORMS[@]}" "$DEST"/*.whl
rm -rf "$check"

wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z -c -o --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + tree))
limit=$((LIMIT_MIB * 1024 * 1024))
ls -l "$DEST"/*.whl | awk '{printf "%9.2f MiB  %s\n", $5 / 1048576, $NF}'
printf 'wheels %.2f MiB + working tree %.2f MiB = %.2f MiB of %d MiB\n' \
  "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total" -gt "$limit" ]; then
  echo "error: over the ${LIMIT_MIB} MiB that may travel to the device machine" >&2
  exit 1
fi
