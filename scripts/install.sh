# Sourced by scripts/dev and scripts/test: create .venv when missing and `pip install -e`
# into it only when pyproject.toml (or the extras asked for) changed since the last install.
install_once() {
  local target="$1"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local stamp=".venv/.cascade-installed-${target//[^a-z]/_}"
  local wanted
  wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) $target"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ] || [ ! -x .venv/bin/cascade ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$target"
    printf '%s' "$wanted" > "$stamp"
  fi
}
