#!/usr/bin/env bash
# Builds the WebAssembly engine (crates/nanogpt-wasm) into wasm/: nanogpt_bg.wasm plus its JavaScript glue for
# Node.js (nanogpt.js, CommonJS; thread.cjs runs one pool thread) and for browsers (web/nanogpt.js, an ES module
# that loads the same .wasm).
#
# The module is built twice: nanogpt_relaxed_bg.wasm with relaxed SIMD (its matrix products use fused
# multiply-adds) and nanogpt_bg.wasm with SIMD128 only, for runtimes without relaxed SIMD. Both export the same
# functions, so one glue serves both; the loader (ts/wasm-build.ts) picks the module when it instantiates it.
#
# The module is built with SIMD and with atomics and shared memory, so that the engine's thread pool runs on
# worker threads. Shared memory needs the standard library rebuilt with atomics (-Zbuild-std): from rustup's
# rust-src where rustup can download it, otherwise (offline machines, Debian) from Debian's rustc-web and its
# std source. wasm-bindgen's CLI is installed into .tools/ at the exact version of the wasm-bindgen crate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=wasm32-unknown-unknown
out=wasm
wasm_bindgen_version=$(sed -n 's/^wasm-bindgen = "=\(.*\)"$/\1/p' crates/nanogpt-wasm/Cargo.toml)
# simd128 is where the engine's kernels and candle's are fast; every current browser and Node.js >= 16 has it.
# Relaxed SIMD is newer (Node.js >= 21, or 20 behind a flag; Chrome >= 114; Firefox >= 145), hence two builds. Threads
# need atomics, a shared imported memory (up to wasm32's 4 GiB) and the thread-local storage symbols that
# wasm-bindgen uses to give each thread its own stack.
thread_features=+atomics,+bulk-memory,+mutable-globals
link_flags='--cfg getrandom_backend="wasm_js"'
for arg in --shared-memory --import-memory --max-memory=4294967296 \
  --export=__wasm_init_tls --export=__tls_size --export=__tls_align --export=__tls_base; do
  link_flags="$link_flags -C link-arg=$arg"
done

say() { printf 'build-wasm: %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

build_with_rustup() {
  command -v rustup >/dev/null 2>&1 || return 1
  rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target" >/dev/null 2>&1 || return 1
  rustup component list --installed 2>/dev/null | grep -q '^rust-src' || rustup component add rust-src >/dev/null 2>&1 || return 1
  say "compiling with $(rustc --version) and rustup's std source (-Zbuild-std)"
  RUSTC_BOOTSTRAP=1 RUSTFLAGS="$rustflags" cargo build --release --target "$target" -Zbuild-std=std,panic_abort -p nanogpt-wasm
}

# Debian packages rustc with the wasm32 target (rustc-web) and the std source that -Zbuild-std compiles.
build_with_debian_rustc() {
  local rustc=/usr/bin/rustc cargo=/usr/bin/cargo
  if [ ! -x "$rustc" ] || [ ! -x "$cargo" ] || ! command -v wasm-ld >/dev/null 2>&1 || ! ls -d /usr/src/rustc-*/library >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
      say "error: no wasm32 standard library: run \`rustup target add $target\`, or (Debian, as root) \`apt-get install rustc-web cargo-web rust-web-src lld\`"
      exit 1
    fi
    say "installing Debian's rustc-web, cargo-web, rust-web-src and lld"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc-web cargo-web rust-web-src lld >/dev/null
  fi
  say "compiling with $("$rustc" --version) and its std source (-Zbuild-std)"
  RUSTC="$rustc" RUSTC_BOOTSTRAP=1 RUSTFLAGS="-C linker=wasm-ld $rustflags" \
    "$cargo" build --release --target "$target" -Zbuild-std=std,panic_abort -p nanogpt-wasm
}

# compile FEATURES TARGET_DIR: one build of the module; each keeps its own target directory, so that a rebuild of
# either recompiles only what changed.
compile() {
  rustflags="-C target-feature=$1,$thread_features $link_flags"
  export CARGO_TARGET_DIR=$2
  build_with_rustup || build_with_debian_rustc
}
compile +simd128 target/wasm
compile +simd128,+relaxed-simd target/wasm-relaxed

wasm_bindgen=wasm-bindgen
if ! { command -v wasm-bindgen >/dev/null 2>&1 && wasm-bindgen --version | grep -q " $wasm_bindgen_version\$"; }; then
  wasm_bindgen=.tools/bin/wasm-bindgen
  if ! { [ -x "$wasm_bindgen" ] && "$wasm_bindgen" --version | grep -q " $wasm_bindgen_version\$"; }; then
    say "installing wasm-bindgen-cli $wasm_bindgen_version into .tools/ (once; a few minutes)"
    # Not --locked: a dependency version its lock file names was yanked from crates.io.
    cargo install wasm-bindgen-cli --version "=$wasm_bindgen_version" --root .tools --quiet
  fi
fi

module=target/wasm/$target/release/nanogpt_wasm.wasm
relaxed_module=target/wasm-relaxed/$target/release/nanogpt_wasm.wasm
bindgen=target/wasm/bindgen
rm -rf "$out" "$bindgen"
"$wasm_bindgen" --target nodejs --weak-refs --out-dir "$bindgen/node" --out-name nanogpt "$module"
"$wasm_bindgen" --target web --weak-refs --out-dir "$bindgen/web" --out-name nanogpt "$module"
"$wasm_bindgen" --target nodejs --weak-refs --out-dir "$bindgen/node-relaxed" --out-name nanogpt "$relaxed_module"
if ! cmp -s "$bindgen/node/nanogpt.js" "$bindgen/node-relaxed/nanogpt.js"; then
  say "error: wasm-bindgen wrote different glue for the relaxed-SIMD module; both modules must export the same functions"
  exit 1
fi
mkdir -p "$out/web"
cp "$bindgen/node/nanogpt_bg.wasm" "$out/"
cp "$bindgen/node-relaxed/nanogpt_bg.wasm" "$out/nanogpt_relaxed_bg.wasm"
# The loader chooses the module and instantiates it (ts/engine.ts); the glue must not load one on its own first.
sed '/^if (require(.worker_threads.)\.isMainThread) {$/,/^}$/d' "$bindgen/node/nanogpt.js" >"$out/nanogpt.js"
if grep -q '^    exports.initSync();$' "$out/nanogpt.js"; then
  say "error: could not remove the Node.js glue's own initialisation (has wasm-bindgen changed it?)"
  exit 1
fi
cp "$bindgen/node/nanogpt.d.ts" crates/nanogpt-wasm/js/thread.cjs "$out/"
# The package is an ES module package; the Node.js glue is CommonJS.
printf '{ "type": "commonjs" }\n' >"$out/package.json"
# The browser glue fetches nanogpt_bg.wasm next to itself by default; point it at the one shared copy.
sed 's|nanogpt_bg\.wasm|../nanogpt_bg.wasm|' "$bindgen/web/nanogpt.js" >"$out/web/nanogpt.js"
cp "$bindgen/web/nanogpt.d.ts" "$out/web/"
printf '{ "type": "module" }\n' >"$out/web/package.json"
say "wrote $out/ ($(du -h "$out/nanogpt_bg.wasm" | cut -f1) of wasm, twice: with and without relaxed SIMD)"
