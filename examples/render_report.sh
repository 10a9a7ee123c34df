#!/usr/bin/env bash
# Render a run's report.html to a PNG screenshot with headless Chromium, to check what a reader sees.
# Usage: examples/render_report.sh OUTDIR/report.html [screenshot.png] [width]
# Needs Debian's chromium package (apt-get install -y chromium). The report is self-contained, so the
# screenshot is taken with the network disabled: a missing picture or a remote resource would show.
set -euo pipefail
report=$(realpath "$1")
shot=${2:-${report%.html}.png}
width=${3:-1100}
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --proxy-server="127.0.0.1:9" \
  --window-size="${width},3000" --screenshot="$(realpath -m "$shot")" "file://${report}" 2>/dev/null
echo "$shot"
