# Sourced (not run) by scripts/run, scripts/test, scripts/check and scripts/bench, from the
# repository root: `locked_venv run` or `locked_venv test` makes ./.venv hold exactly the
# versions of requirements/<set>.lock (hash-checked), then the project itself (editable, no
# dependencies of its own choosing, no build isolation: setuptools comes from the lock too).
#
# A stamp in .venv records a hash of the lock, pyproject.toml and the venv's Python; when it
# matches, nothing is installed and no package index is asked. test.lock holds run.lock's
# versions plus the test and lint tools, so a venv installed from it serves scripts/run too.
# PYTHON picks the interpreter for a new .venv (default python3); delete .venv to change it.

_lock_hash() {  # the stamp .venv/.locked-<set> must hold for requirements/<set>.lock
  cat "requirements/$1.lock" pyproject.toml .venv/pyvenv.cfg | sha256sum | cut -d' ' -f1
}

_stamp_ok() {
  [ -f ".venv/.locked-$1" ] && [ "$(cat ".venv/.locked-$1")" = "$(_lock_hash "$1")" ]
}

locked_venv() {
  local set=$1
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c '' 2>/dev/null; then
    rm -rf .venv
    "${PYTHON:-python3}" -m venv .venv
  fi
  # A venv that once held the test set keeps it: scripts/run or scripts/bench after
  # scripts/test must not take the test tools away when a lock changed.
  if [ "$set" = run ] && [ -f .venv/.locked-test ]; then
    set=test
  fi
  if _stamp_ok "$set"; then
    return 0
  fi
  echo "Installing requirements/$set.lock and ops-router into ./.venv ..." >&2
  rm -f .venv/.locked-*
  local pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)
  "${pip[@]}" install --require-hashes -r "requirements/$set.lock"
  # What an older lock installed and this one does not: gone, so it cannot hide a missing
  # dependency.
  local extra
  extra=$(.venv/bin/python - "requirements/$set.lock" <<'EOF'
import importlib.metadata as md
import re
import sys

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

text = open(sys.argv[1], encoding="utf-8").read()
keep = {norm(n) for n in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", text, re.M)}
keep |= {"pip", "ops-router"}
print(" ".join(sorted({norm(d.metadata["Name"]) for d in md.distributions()} - keep)))
EOF
  )
  if [ -n "$extra" ]; then
    # shellcheck disable=SC2086
    "${pip[@]}" uninstall --yes $extra
  fi
  "${pip[@]}" install --no-deps --no-build-isolation --editable .
  if ! "${pip[@]}" check >&2; then
    echo "requirements/$set.lock does not satisfy pyproject.toml: run scripts/lock" >&2
    return 1
  fi
  _lock_hash "$set" > ".venv/.locked-$set"
}
