# Source this (`. plugins/gstreamer/env.sh`) with the project's venv active: GStreamer then finds
# the `syndiffseg` element, and Python finds Debian's GStreamer bindings (gi).
#
# Debian builds python3-gi for its Python 3.11, the venv runs Python 3.11 too (same ABI), so the
# bindings load as they are. Only `gi` is exposed (through a one-link folder), not all of Debian's
# dist-packages, so Debian's older copies of other packages never shadow the venv's.
_syndiff_gst_dir="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
_syndiff_repo="$(cd "$_syndiff_gst_dir/../.." && pwd)"
_syndiff_gi="${SYNDIFF_GI_DIR:-/usr/lib/python3/dist-packages/gi}"
if [ ! -d "$_syndiff_gi" ]; then
  echo "env.sh: $_syndiff_gi not found: apt-get install python3-gst-1.0 gstreamer1.0-python3-plugin-loader (see .ci/system-deps)" >&2
else
  _syndiff_shim="${XDG_CACHE_HOME:-$HOME/.cache}/syndiff-stream/debian-gi"
  mkdir -p "$_syndiff_shim" && ln -sfn "$_syndiff_gi" "$_syndiff_shim/gi"
  export PYTHONPATH="$_syndiff_shim:$_syndiff_repo${PYTHONPATH:+:$PYTHONPATH}"
fi
export GST_PLUGIN_PATH="$_syndiff_gst_dir${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
unset _syndiff_gst_dir _syndiff_repo _syndiff_gi _syndiff_shim
