#!/usr/bin/env bash
# Make sure Chromium is installed for the browser tests of the tree viewer (tests/test_viz_browser.py).
#
# The tests drive Debian's `chromium` package through Playwright (never a browser downloaded by
# `playwright install`). When the executable is missing: as root with apt-get, install it; otherwise stop with
# the command to run. Environment: W2S_CHROMIUM (default /usr/bin/chromium), the executable the tests use.
set -euo pipefail

CHROMIUM=${W2S_CHROMIUM:-/usr/bin/chromium}
say() { echo "[setup] $*" >&2; }

if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "${W2S_CHROMIUM:-}" != "" ]; then
  say "ERROR: W2S_CHROMIUM=$CHROMIUM is not an executable"
  exit 1
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  say "installing Debian's chromium for the browser tests (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  if [ -x "$CHROMIUM" ]; then
    say "chromium installed: $("$CHROMIUM" --version 2>/dev/null | head -n 1)"
    exit 0
  fi
  say "ERROR: apt-get installed chromium but $CHROMIUM is still missing"
  exit 1
fi
say "ERROR: the browser tests need Chromium at $CHROMIUM. Install it with:"
say "    sudo apt-get update && sudo apt-get install -y chromium"
say "or point W2S_CHROMIUM at a Chromium executable."
exit 1
