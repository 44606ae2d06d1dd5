#!/usr/bin/env bash
# Installs Debian's headless Chromium for the report's browser test (Playwright drives it
# through `executable_path`; Playwright's own browser download is never used).
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium
