#!/usr/bin/env bash
# Install the Debian text packages the embedded SAE corpus reads (about 30 MB). Without root or apt this only warns:
# the corpus then runs in a logged, degraded mode over the sources that exist (see src/esr/corpus.py).
set -u
missing=()
for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "WARNING: could not install ${missing[*]}; the embedded corpus will run degraded" >&2
else
  echo "WARNING: Debian packages ${missing[*]} are missing and cannot be installed here (not root or no apt);" \
       "the embedded SAE corpus will run in a degraded mode over the remaining sources" >&2
fi
exit 0
