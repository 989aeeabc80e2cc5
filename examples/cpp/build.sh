#!/bin/sh
# Build examples/cpp/build/echoembed-cpp against the libraries in a Python venv (what `make cpp`
# runs). Usage: examples/cpp/build.sh PYTHON   (the venv's python, e.g. .venv/bin/python)
#
# Headers: ONNX Runtime's public headers (Debian's libonnxruntime-dev, trixie: 1.21; the C API is
# append-only, so they drive the newer library the onnxruntime wheel ships) and nlohmann/json,
# fetched with apt-get download into a private apt state under build/ and unpacked with
# dpkg-deb -x (no root, nothing installed). When the venv's Python has no shared libpython
# (which onnxruntime-extensions' library needs), Debian's libpython3.X is fetched the same way.
# ECHOEMBED_DEB_SUITES / ECHOEMBED_DEB_MIRROR override the suites and the mirror.
set -eu
PYTHON=${1:?usage: build.sh PYTHON}
HERE=$(cd "$(dirname "$0")" && pwd)
BUILD=$HERE/build
DEPS=$BUILD/deps
SUITES=${ECHOEMBED_DEB_SUITES:-trixie bookworm}
MIRROR=${ECHOEMBED_DEB_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# The libraries, from the venv: onnxruntime's, onnxruntime-extensions' and libpython.
LIBS=$("$PYTHON" - <<'PY'
import glob, os, sys, sysconfig
import onnxruntime, onnxruntime_extensions
def first(pattern):
    found = sorted(glob.glob(pattern))
    return found[0] if found else "-"
ort = first(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.1*"))
ortx = first(os.path.join(os.path.dirname(onnxruntime_extensions.__file__), "_extensions_pydll*.so"))
name = sysconfig.get_config_var("INSTSONAME") or ""
py = [os.path.join(sysconfig.get_config_var(d) or "", name) for d in ("LIBDIR", "LIBPL")]
py = [p for p in py if ".so" in name and os.path.isfile(p)] or ["-"]
print(ort, ortx, py[0], "%d.%d" % sys.version_info[:2])
PY
)
set -- $LIBS
ORT=$1 ORTX=$2 PYLIB=$3 PYVER=$4
[ "$ORT" != - ] && [ "$ORTX" != - ] || {
  echo "build.sh: $PYTHON lacks onnxruntime or onnxruntime-extensions: pip install -e '.[cpp]'" >&2
  exit 1; }
PACKAGES="libonnxruntime-dev nlohmann-json3-dev"
[ -f "$PYLIB" ] || PACKAGES="$PACKAGES libpython$PYVER"
STAMP=$DEPS/.fetched-$(echo "$SUITES $PACKAGES" | tr ' ' '_')

if [ ! -f "$STAMP" ]; then
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    echo "build.sh: needs apt-get and dpkg-deb (Debian/Ubuntu) to fetch $PACKAGES" >&2; exit 1; }
  [ -f "$KEYRING" ] || { echo "build.sh: $KEYRING is missing (debian-archive-keyring)" >&2; exit 1; }
  rm -rf "$DEPS"
  APT=$DEPS/apt
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/parts" "$DEPS/debs" "$DEPS/root"
  : > "$APT/status"
  for s in $SUITES; do echo "deb [signed-by=$KEYRING] $MIRROR $s main"; done > "$APT/sources.list"
  set -- -q -o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/parts" \
    -o "Dir::State=$APT" -o "Dir::State::Lists=$APT/lists" -o "Dir::State::status=$APT/status" \
    -o "Dir::Cache=$APT/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)"
  echo "fetching $PACKAGES from Debian ($SUITES) ..."
  apt-get "$@" update >/dev/null
  (cd "$DEPS/debs" && apt-get "$@" download $PACKAGES >/dev/null)
  for deb in "$DEPS"/debs/*.deb; do dpkg-deb -x "$deb" "$DEPS/root"; done
  rm -rf "$APT"
  touch "$STAMP"
fi
if [ ! -f "$PYLIB" ]; then
  PYLIB=$(ls "$DEPS"/root/usr/lib/*/libpython"$PYVER".so.1* 2>/dev/null | head -n 1)
  [ -n "$PYLIB" ] || { echo "build.sh: no shared libpython$PYVER found or fetched" >&2; exit 1; }
fi

cmake -S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DDEPS_INCLUDE="$DEPS/root/usr/include" \
  -DORT_LIBRARY="$ORT" -DORTX_LIBRARY="$ORTX" -DPYTHON_LIBRARY="$PYLIB" >/dev/null
cmake --build "$BUILD" -j "$(nproc 2>/dev/null || echo 2)"
