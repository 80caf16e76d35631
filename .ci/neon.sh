#!/usr/bin/env bash
# ARM proof of the C kernels: cross-compile src_cy/*.c and the harness (src_cy/tests/test_kernels.c)
# for aarch64, run it under qemu-aarch64-static on a CPU without the dot-product extension
# (cortex-a53: plain NEON path), one with it but without i8mm (cortex-a76: SDOT path, i8mm skipped)
# and one with both (max: SMMLA path), then build and run the same harness natively (x86: scalar,
# AVX2 and, where the CPU has it, AVX-512). The harness compares every path against its own naive
# reference and exits non-zero on any mismatch; so does this script. The attention of every SIMD path
# (AVX2, AVX-512, NEON) must also hash to the same output bits on both architectures.
#
# Usage: .ci/neon.sh        (from anywhere in a clone; installs its apt packages when missing)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
src=(src_cy/ternary_gemm.c src_cy/ternary_avx2.c src_cy/ternary_avx512.c src_cy/ternary_neon.c src_cy/ternary_lut.c src_cy/tests/test_kernels.c)

# -O2 and no -march: the dot-product and i8mm kernels carry their own target attributes and are chosen at run
# time, exactly as in the Python extension. Static, so qemu needs no aarch64 sysroot.
aarch64-linux-gnu-gcc -O2 -std=c11 -ffp-contract=off -Wall -Wextra -Werror -fopenmp -static -Isrc_cy "${src[@]}" -lm \
    -o "$out/test_kernels_arm64" 2> >(grep -v "dlopen\|oacc-profiling" >&2 || true)

run_arm() {  # cpu expected-isa
    echo "== qemu-aarch64-static -cpu $1"
    qemu-aarch64-static -cpu "$1" "$out/test_kernels_arm64" | tee "$out/log"
    cat "$out/log" >> "$out/all.log"
    if ! grep -q "best isa $2," "$out/log"; then
        echo "expected the $2 path on -cpu $1" >&2
        exit 1
    fi
}
run_arm cortex-a53 neon           # ARMv8.0: no SDOT, plain NEON + scalar tested
run_arm cortex-a76 neon-dotprod   # SDOT, no i8mm: the i8mm table must be skipped (falls back)
run_arm max neon-i8mm             # SDOT and i8mm (SMMLA): scalar, NEON, dot-product and i8mm tested

echo "== native $(uname -m)"
cc -O2 -std=c11 -ffp-contract=off -Wall -Wextra -Werror -fopenmp -Isrc_cy "${src[@]}" -lm -o "$out/test_kernels_native"
"$out/test_kernels_native" | tee "$out/log"
cat "$out/log" >> "$out/all.log"

# the SIMD attention paths promise the same bits on every ISA and architecture (one hash for all)
grep "^attention fingerprint" "$out/all.log" | sort -u
if [ "$(grep "^attention fingerprint" "$out/all.log" | awk '{print $4}' | sort -u | wc -l)" -ne 1 ]; then
    echo "the attention outputs of the SIMD paths differ between ISAs or architectures (above)" >&2
    exit 1
fi
# the int8 attention sums exactly and rounds in one fixed order: one hash on every path, scalar included
grep "^attention-int8 fingerprint" "$out/all.log" | sort -u
if [ "$(grep "^attention-int8 fingerprint" "$out/all.log" | awk '{print $4}' | sort -u | wc -l)" -ne 1 ]; then
    echo "the int8 attention outputs differ between paths or architectures (above)" >&2
    exit 1
fi
# the fp32 GEMM (every M), SwiGLU and the dense layer promise the same bits on every path, scalar included
grep "^float fingerprint" "$out/all.log" | sort -u
if [ "$(grep "^float fingerprint" "$out/all.log" | awk '{print $4}' | sort -u | wc -l)" -ne 1 ]; then
    echo "the fp32 GEMM, SwiGLU or dense outputs differ between paths or architectures (above)" >&2
    exit 1
fi
echo "neon.sh: all paths agree with the reference; attention, the fp32 GEMM, SwiGLU and dense have the same bits on every SIMD path"
