#!/usr/bin/env bash
# Debian's headless Chromium and its WebDriver, for tests/serve/test_chat_page.py.
# Idempotent: does nothing when both are already there. Needs root (CI runs as root).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
/usr/bin/chromium --version
