# Sourced by the scripts: finds CPython interpreters and builds the project's virtualenvs.

# find_python MINOR...: the first python3.MINOR found on PATH or under pyenv, newest MINOR first.
find_python() {
    local minor candidate
    for minor in "$@"; do
        for candidate in "$(command -v "python3.$minor" 2>/dev/null)" \
            "$HOME"/.pyenv/versions/3."$minor".*/bin/python3; do
            # pyenv's shims exist for versions that are not active, and then fail: try each.
            if [ -n "$candidate" ] && [ -x "$candidate" ] \
                && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
                echo "$candidate"
                return 0
            fi
        done
    done
    return 1
}

# make_venv PYTHON DIR EXTRAS: a virtualenv at DIR with the project installed editable.
make_venv() {
    local python=$1 dir=$2 extras=$3
    if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c 'import sys; sys.exit(0)' 2>/dev/null; then
        rm -rf "$dir"
        "$python" -m venv "$dir"
    fi
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]" \
        2> >(grep -v "^WARNING: Location" >&2)
}
