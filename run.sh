#!/usr/bin/env bash
# The one entry point a person types: ./run.sh <command> [args...]   (./run.sh help for the commands)
#
# Runs `python -m ipu_effnet <command> [args...]` from the repository root in the project virtualenv.
# The virtualenv is created and filled from requirements.txt on first use; a stamp inside it (a hash
# of the requirements file) keeps later calls from reinstalling until the file changes. Installing is
# serialised with flock, so poprun may start many copies at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"

# Paths given in the environment are relative to the caller's directory.
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

VENV="$(abspath "${IPU_EFFNET_VENV:-$ROOT/.venv}")"
VENV="${VENV%/}"
LOCK="$VENV.lock"
REQ="$(abspath "${IPU_EFFNET_REQUIREMENTS:-$ROOT/requirements.txt}")"
TEST_REQ="$(abspath "${IPU_EFFNET_TEST_REQUIREMENTS:-$ROOT/requirements-test.txt}")"
# Optional features (TensorBoard, ONNX export) and the tests' peers installed without their dependencies:
# installed with the test extras when the files exist.
EXTRAS_REQ="$ROOT/requirements-extras.txt"
NODEPS_REQ="$ROOT/requirements-test-nodeps.txt"
BASE_PYTHON="${PYTHON:-python3}"
NO_VENV="${IPU_EFFNET_NO_VENV:-0}"
case "$NO_VENV" in 0 | "" | false | no) NO_VENV=0 ;; *) NO_VENV=1 ;; esac

PIP_FLAGS=(-q --disable-pip-version-check)

msg() { printf 'ipu_effnet: %s\n' "$*" >&2; }
die() {
    msg "error: $*"
    exit 1
}

# Short name for messages: ".venv" rather than /long/path/.venv when inside the repository.
short() { case "$1" in "$ROOT"/*) printf '%s\n' "${1#"$ROOT"/}" ;; *) printf '%s\n' "$1" ;; esac; }

usage() {
    cat <<EOF
usage: ./run.sh <command> [args...]

Runs 'python -m ipu_effnet <command> [args...]' from the repository root, in the project
virtualenv (.venv), which is created and filled from requirements.txt on first use.
Relative paths in arguments are relative to the repository root.

run.sh's own commands:
  help                  this text, then the ipu_effnet commands
  setup [--test]        create or update the virtualenv (--test: with the test and optional extras), then exit
  test [pytest args]    also install requirements-test.txt, requirements-extras.txt (tensorboard, onnx,
                        onnxruntime) and requirements-test-nodeps.txt (with --no-deps), then python -m
                        pytest (default: tests/)
  lint [ruff args]      ruff check ipu_effnet norms tests, then lint-imports (the layers in pyproject.toml)
  env                   print the interpreter, virtualenv and package versions in use
  python [args]         run the environment's python, e.g. ./run.sh python -c 'import torch'
  <anything else>       python -m ipu_effnet <anything else> [args]

Environment:
  IPU_EFFNET_VENV=DIR   virtualenv to use (default: <repo>/.venv; its lock file is DIR.lock)
  IPU_EFFNET_NO_VENV=1  use the current interpreter (\$PYTHON, else python3) as it is and install
                        nothing: for the Poplar SDK's venv, where poptorch lives
                        (there: pip install -r requirements-ipu.txt once, by hand)
  PYTHON=EXE            interpreter that creates the virtualenv (default: python3)
  IPU_EFFNET_REQUIREMENTS=FILE, IPU_EFFNET_TEST_REQUIREMENTS=FILE
                        other requirement files (default: requirements.txt, requirements-test.txt)
  pip's own settings (PIP_INDEX_URL, PIP_FIND_LINKS, pip.conf) apply to the install.
EOF
}

file_hash() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum <"$1"
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 <"$1"
    else
        cksum <"$1"
    fi | cut -d' ' -f1
}

# True when the virtualenv's interpreter runs and has pip (checked only on the slow path).
venv_works() { [ -f "$VENV/pyvenv.cfg" ] && "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; }

create_venv() {
    if [ -e "$VENV" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
        [ -f "$VENV/pyvenv.cfg" ] ||
            die "$VENV exists but is not a virtualenv; move it away or set IPU_EFFNET_VENV"
        msg "$(short "$VENV") is broken (its python does not run or has no pip); recreating it"
        rm -rf "$VENV"
    fi
    command -v "$BASE_PYTHON" >/dev/null 2>&1 ||
        die "'$BASE_PYTHON' not found: install Python 3.8+ or set PYTHON=/path/to/python3"
    "$BASE_PYTHON" -m venv "$VENV" ||
        die "'$BASE_PYTHON -m venv $VENV' failed (on Debian/Ubuntu: apt-get install python3-venv)"
}

# ensure_requirements NAME FILE [PIP ARGS...]: make sure FILE is installed in the virtualenv (with the
# extra pip arguments, e.g. --no-deps). Fast path (no lock): the virtualenv's python exists and its
# stamp NAME holds FILE's hash.
ensure_requirements() {
    local name="$1" file="$2" stamp want have="" created=0
    shift 2
    [ -f "$file" ] || die "requirements file not found: $file"
    stamp="$VENV/.ipu_effnet-$name.stamp"
    want="$(file_hash "$file")"
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(<"$stamp")" = "$want" ]; then
        return 0
    fi

    mkdir -p "$(dirname "$VENV")"
    exec 9>"$LOCK"
    if command -v flock >/dev/null 2>&1; then
        if ! flock -n 9; then
            msg "waiting for another run.sh to finish installing into $(short "$VENV")..."
            flock 9
        fi
    else
        msg "warning: flock not found; not serialising the install (do not start several at once)"
    fi

    # Re-check under the lock: another process may have done the work meanwhile.
    if ! venv_works; then
        msg "creating $(short "$VENV") and installing $(short "$file") (first run, about a minute)..."
        create_venv
        created=1
    fi
    [ -f "$stamp" ] && have="$(<"$stamp")"
    if [ "$have" != "$want" ]; then
        if [ "$created" = 0 ]; then
            if [ -n "$have" ]; then
                msg "$(short "$file") changed; updating $(short "$VENV")..."
            else
                msg "installing $(short "$file") into $(short "$VENV")..."
            fi
        fi
        rm -f "$stamp"
        local rc=0
        "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" "$@" -r "$file" || rc=$?
        [ "$rc" = 0 ] || die "pip install -r $(short "$file") failed (exit $rc); see pip's output above"
        printf '%s\n' "$want" >"$stamp.tmp.$$"
        mv -f "$stamp.tmp.$$" "$stamp"
    fi
    exec 9>&- # release the lock before running anything long
}

# Sets PY to the interpreter to run; installs requirements (and test extras when $1 = test).
prepare() {
    if [ "$NO_VENV" = 1 ]; then
        command -v "$BASE_PYTHON" >/dev/null 2>&1 ||
            die "IPU_EFFNET_NO_VENV=1 but '$BASE_PYTHON' not found (set PYTHON=...)"
        PY="$BASE_PYTHON"
        return 0
    fi
    ensure_requirements requirements "$REQ"
    if [ "${1:-}" = test ]; then
        ensure_requirements test "$TEST_REQ"
        if [ -f "$EXTRAS_REQ" ]; then ensure_requirements extras "$EXTRAS_REQ"; fi
        # --no-deps: these declare torchvision, which pip would resolve to another torch
        if [ -f "$NODEPS_REQ" ]; then ensure_requirements test-nodeps "$NODEPS_REQ" --no-deps; fi
    fi
    PY="$VENV/bin/python"
    export VIRTUAL_ENV="$VENV"
    export PATH="$VENV/bin:$PATH"
}

# In IPU_EFFNET_NO_VENV mode nothing is installed: say what is missing instead of a traceback.
need_module() {
    [ "$NO_VENV" = 1 ] || return 0
    "$PY" -c "import $1" >/dev/null 2>&1 ||
        die "$1 is not installed for $PY (IPU_EFFNET_NO_VENV=1): pip install -r $(short "$TEST_REQ")"
}

cmd="${1:-help}"
if [ "$#" -gt 0 ]; then shift; fi
cd "$ROOT"

case "$cmd" in
help | -h | --help)
    usage
    prepare
    printf '\nipu_effnet commands (python -m ipu_effnet --help):\n'
    exec "$PY" -m ipu_effnet --help
    ;;
setup)
    case "${1:-}" in --test | test) prepare test ;; "") prepare ;; *) die "usage: ./run.sh setup [--test]" ;; esac
    msg "ready: $PY"
    ;;
test)
    prepare test
    need_module pytest
    exec "$PY" -m pytest "$@"
    ;;
lint)
    prepare test
    need_module ruff
    need_module importlinter
    "$PY" -m ruff check ipu_effnet norms tests "$@"
    # the import layers in pyproject.toml ([tool.importlinter]); lint-imports reads the package from the root
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -c 'import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())'

    ;;
env)
    prepare
    exec "$PY" - "$VENV" "$NO_VENV" "$ROOT" <<'EOF'
import sys
try:
    from importlib.metadata import PackageNotFoundError, version
except ImportError:  # Python < 3.8
    version = None
venv, no_venv, root = sys.argv[1:4]
print("python:", sys.executable)
print("version:", sys.version.split()[0])
print("venv:", "none (IPU_EFFNET_NO_VENV=1)" if no_venv == "1" else venv)
print("root:", root)
for dist in ("torch", "poptorch", "popdist", "numpy"):
    try:
        found = version(dist) if version else "?"
    except PackageNotFoundError:
        found = "not installed"
    print(dist + ":", found)
EOF
    ;;
python)
    prepare
    exec "$PY" "$@"
    ;;
*)
    prepare
    exec "$PY" -m ipu_effnet "$cmd" "$@"
    ;;
esac
