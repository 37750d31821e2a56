#!/usr/bin/env bash
# Install alexnet-dist into the Python environment of $PYTHON (default: python3).
#
# The Dockerfile runs this script in two layers so that a code change does not reinstall torch:
#   cluster/install.sh deps            # dependencies of pyproject.toml, pinned by cluster/constraints.txt
#   cluster/install.sh package check   # the package itself (--no-deps), then a check that it works
# With no argument it runs all three phases. tests/cluster/ runs the same phases on a CI machine
# in a fresh venv that sees the project's .venv, with PIP_NO_INDEX=1: there `deps` must find every pin
# already satisfied, and `package` + `check` really install and run the package.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-python3}"
constraints="$here/constraints.txt"

pip() { "$PYTHON" -m pip --disable-pip-version-check "$@"; }

requirements() {
    # The dependency list of pyproject.toml, one per line (tomllib: Python >= 3.11).
    "$PYTHON" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project["dependencies"]))
PY
}

deps() {
    local reqs
    reqs="$(mktemp)"
    requirements >"$reqs"
    # setuptools is the build backend `package` uses without build isolation.
    echo "setuptools" >>"$reqs"
    pip install --requirement "$reqs" --constraint "$constraints"
    rm -f "$reqs"
}

package() {
    # --no-deps: the dependencies came from `deps` (their own cached layer in the image).
    # --ignore-installed: never uninstall a copy that lives outside this environment.
    pip install --no-deps --no-build-isolation --ignore-installed "$root"
    # The C kernels, built once here so that no node compiles at run time. --portable: an image runs on
    # CPUs other than the one that built it (ALEXNET_DIST_NATIVE_KERNELS=1 builds for this one).
    # Run from / so that the installed package is the one built into, not a source tree in the cwd.
    local portable="--portable"
    [ "${ALEXNET_DIST_NATIVE_KERNELS:-0}" = 1 ] && portable=""
    (cd / && "$PYTHON" -m alexnet_dist.kernels.library $portable)
}

check() {
    "$PYTHON" "$here/check_requirements.py" "$root/pyproject.toml" "$constraints"
    local bin
    bin="$("$PYTHON" -c 'import sys, os; print(os.path.dirname(sys.executable))')"
    "$bin/alexnet-dist" --help >/dev/null
    echo "check: $bin/alexnet-dist --help ran"
    (cd / && "$PYTHON" -c 'from alexnet_dist.kernels import lrn, maxpool
assert lrn.available() and maxpool.available(), "C kernels not loadable"')
    echo "check: the C kernels load"
}

phases=("$@")
if [ ${#phases[@]} -eq 0 ]; then
    phases=(deps package check)
fi
for phase in "${phases[@]}"; do
    case "$phase" in
        requirements | deps | package | check) "$phase" ;;
        *)
            echo "install.sh: unknown phase '$phase'; use requirements, deps, package or check" >&2
            exit 2
            ;;
    esac
done
