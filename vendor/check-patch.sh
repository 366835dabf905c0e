#!/usr/bin/env bash
# Checks that vendor/candle-core is the published candle-core 0.11.1 with the vendoring's
# removals (vendor/README.md) and vendor/candle-core.patch applied, and differs in nothing
# else. Needs the crates registry (cargo fetches the crate), so it is not part of CI.
# Exit 0: identical; 1: the differences are listed.
#   vendor/check-patch.sh           check
#   vendor/check-patch.sh --write   regenerate candle-core.patch from vendor/candle-core first
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=0.11.1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The published crate through cargo, which checks it against the registry index's checksum: a
# throwaway package that depends on exactly this version.
mkdir "$tmp/fetch"
cat >"$tmp/fetch/Cargo.toml" <<EOF
[package]
name = "fetch-candle-core"
version = "0.0.0"
edition = "2021"
publish = false

[lib]
path = "lib.rs"

[dependencies]
candle-core = { version = "=$version", default-features = false }
EOF
touch "$tmp/fetch/lib.rs"
(cd "$tmp/fetch" && cargo fetch --quiet --target x86_64-unknown-linux-gnu)
want=$(awk '/^name = "candle-core"$/ { c = 1 } c && /^checksum/ { gsub(/"/, "", $3); print $3; exit }' \
    "$tmp/fetch/Cargo.lock")
crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/candle-core-$version.crate | head -n 1)
echo "$want  $crate" | sha256sum --check --quiet
echo "candle-core $version: $crate (sha256 $want)"

# What the vendoring drops: examples, tests, benches, the packaging files, and their
# [[example]] / [[test]] / [[bench]] / [dev-dependencies] tables in Cargo.toml.
up="$tmp/candle-core-$version"
tar -xzf "$crate" -C "$tmp"
rm -rf "$up/examples" "$up/tests" "$up/benches" "$up/Cargo.toml.orig" "$up/Cargo.lock" \
    "$up/.cargo_vcs_info.json"
awk '/^\[/ { skip = ($0 ~ /^\[\[(example|test|bench)\]\]$/ || $0 ~ /^\[dev-dependencies/) }
     !skip { print }' "$up/Cargo.toml" >"$tmp/Cargo.toml"
mv "$tmp/Cargo.toml" "$up/Cargo.toml"

if [ "${1:-}" = "--write" ]; then
    # The patch: every file that differs, as a unified diff relative to the crate's root (no
    # timestamps, so it only changes with the code).
    (cd "$tmp" && mv "candle-core-$version" a && cp -r "$here/candle-core" b &&
        { diff -ruN a b || [ $? -eq 1 ]; } | sed -E 's/^(---|\+\+\+) ([^\t]*)\t.*/\1 \2/' \
            >"$here/candle-core.patch")
    mv "$tmp/a" "$up"
    echo "wrote vendor/candle-core.patch"
fi

patch -d "$up" -p1 --quiet --forward --no-backup-if-mismatch <"$here/candle-core.patch"
if diff -r "$up" "$here/candle-core"; then
    echo "vendor/candle-core is candle-core $version, less the removals, plus candle-core.patch: nothing else"
else
    echo "vendor/candle-core differs from candle-core $version + candle-core.patch (above)" >&2
    exit 1
fi
