#!/usr/bin/env bash
# Install Debian's Chromium for the cross-origin browser test (tests/service/api/test_browser_cross_origin.py),
# if it is not there. Used by .ci/run; the test skips without it locally and fails without it under CI=true.
set -u
# the same names the test looks for
command -v chromium >/dev/null 2>&1 && exit 0
command -v chromium-browser >/dev/null 2>&1 && exit 0
command -v apt-get >/dev/null 2>&1 || { echo "no apt-get: install Chromium yourself" >&2; exit 0; }
echo "installing chromium (Debian package)" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
apt-get install -y -q chromium >"$log" 2>&1 || { apt-get update -q >>"$log" 2>&1 && apt-get install -y -q chromium >>"$log" 2>&1; } \
  || { echo "chromium could not be installed:" >&2; tail -n 20 "$log" >&2; }
rm -f "$log"
exit 0
