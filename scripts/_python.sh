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

# _extras LIST: a comma-separated list of extras, sorted, each once.
_extras() {
    echo "$1" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -
}

# _install DIR SPEC: the project editable with SPEC's extras into the virtualenv at DIR, by uv
# when it can be had (it comes into DIR from the package index: 2 s) and by pip otherwise.
# uv resolves, downloads and compiles in parallel: 4 s where pip takes 17 s.
_install() {
    local dir=$1 spec=$2
    [ -x "$dir/bin/uv" ] || "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
        uv 2> >(grep -v "^WARNING: Location" >&2) || true
    if [ -x "$dir/bin/uv" ]; then
        "$dir/bin/uv" pip install --quiet --python "$dir/bin/python" --compile-bytecode -e "$spec"
    else
        echo "make_venv: uv could not be had, pip installs instead" >&2
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec" \
            2> >(grep -v "^WARNING: Location" >&2)
    fi
}

# make_venv PYTHON DIR EXTRAS: a virtualenv at DIR on PYTHON's version, with the project installed
# editable with EXTRAS (comma-separated). A virtualenv of another Python version (or a broken one)
# is rebuilt. The install runs only when the interpreter, pyproject.toml or the extras changed
# since it last did (a stamp in DIR records them); an editable install picks up code changes by itself.
# Extras installed before are kept, so scripts asking for different extras share one virtualenv.
make_venv() {
    local python=$1 dir=$2 extras=$3 version have stamp installed wanted
    version=$("$python" -c 'import platform; print(platform.python_version())')
    have=$("$dir/bin/python" -c 'import platform; print(platform.python_version())' 2>/dev/null || true)
    if [ "${have%.*}" != "${version%.*}" ]; then
        rm -rf "$dir"
        "$python" -m venv "$dir"
    fi
    stamp="python $version, pyproject.toml $(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ "$(head -n 1 "$dir/.vsock-async-stamp" 2>/dev/null)" = "$stamp" ]; then
        installed=$(sed -n 2p "$dir/.vsock-async-stamp")
        wanted=$(_extras "$installed,$extras")
        if [ "$wanted" = "$installed" ]; then
            return 0
        fi
    else
        wanted=$(_extras "$extras")
    fi
    _install "$dir" ".[$wanted]"
    printf '%s\n%s\n' "$stamp" "$wanted" > "$dir/.vsock-async-stamp"
}
