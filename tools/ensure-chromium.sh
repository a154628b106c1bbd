#!/usr/bin/env bash
# Part of `make test`: the browser tests (run and study reports rendered in headless Chromium, the
# kaleido PNG export) need a Chrome/Chromium on PATH. When none is there, install the Debian package
# `chromium` if this user can (root, or passwordless sudo) and apt-get exists; otherwise stop with one
# line saying what to install. Exit status 0 means a browser is on PATH.
set -euo pipefail

BROWSERS="chromium chromium-browser google-chrome google-chrome-stable"

have_browser() {
  local b
  for b in $BROWSERS; do
    if command -v "$b" >/dev/null 2>&1; then return 0; fi
  done
  return 1
}

stop() {
  echo "make test: $1" >&2
  exit 1
}

if have_browser; then exit 0; fi
WHAT="the browser tests need Chromium: install the Debian package 'chromium' (apt-get install chromium) or put chromium or google-chrome on PATH, then run 'make test' again"
command -v apt-get >/dev/null 2>&1 || stop "$WHAT (no apt-get here)"
if [ "$(id -u)" = 0 ]; then
  as_root() { DEBIAN_FRONTEND=noninteractive "$@"; }
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root() { sudo -n env DEBIAN_FRONTEND=noninteractive "$@"; }
else
  stop "$WHAT (not root and no passwordless sudo, so it cannot be installed from here)"
fi
echo "== make test: Chromium is missing; installing the Debian package chromium (apt-get update && apt-get install -y chromium)"
as_root apt-get update || stop "$WHAT ('apt-get update' failed)"
as_root apt-get install -y chromium || stop "$WHAT ('apt-get install -y chromium' failed)"
have_browser || stop "$WHAT (apt-get installed chromium but no browser is on PATH)"
echo "== make test: installed $(command -v chromium || true)"
