# Sourced by scripts/install.sh and scripts/compat.sh: the one way this project makes a venv.
#
#   install_venv VENV PACKAGE... [--no-deps PACKAGE...]
#
# VENV is made if absent; torch 2.13.0 (the CPU build) goes in first and stays pinned on the pip
# line that installs PACKAGE..., so no dependency can pull a CUDA wheel or another torch; the
# packages after --no-deps are installed without their dependencies. Idempotent: a venv whose
# recorded request (the arguments and pyproject.toml's hash) matches is left alone, without pip.
TORCH_PIN=torch==2.13.0
PIP_FLAGS=(-q --disable-pip-version-check)

install_venv() {
  local venv=$1 arg
  shift
  local packages=() no_deps=() into=packages
  for arg in "$@"; do
    if [ "$arg" = --no-deps ]; then into=no_deps; continue; fi
    if [ "$into" = packages ]; then packages+=("$arg"); else no_deps+=("$arg"); fi
  done
  local stamp
  stamp="$* $(sha256sum pyproject.toml | cut -c1-16)"
  [ "$(cat "$venv/.install-stamp" 2>/dev/null)" = "$stamp" ] && return 0
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install "${PIP_FLAGS[@]}" "$TORCH_PIN"
  "$venv/bin/pip" install "${PIP_FLAGS[@]}" "${packages[@]}" "$TORCH_PIN"
  if [ ${#no_deps[@]} -gt 0 ]; then "$venv/bin/pip" install "${PIP_FLAGS[@]}" --no-deps "${no_deps[@]}"; fi
  echo "$stamp" > "$venv/.install-stamp"
}
