#!/usr/bin/env bash
# The unit tests of the code with `unsafe` blocks (the CPU kernels: Bezier, convolutions and
# their im2col/GEMM buffers, GroupNorm, softmax, attention; the fused optimizer loops) under
# valgrind memcheck, which reports reads of uninitialised memory that steer the program
# (branches, addresses, system calls: the tests' comparisons of every result) and heap
# accesses out of bounds. Miri is the finer tool (it also checks aliasing and every read of
# uninitialised memory, not only those that steer), but it needs the nightly toolchain and
# interprets: the small unit tests run under it
#   MIRIFLAGS="-Zmiri-tree-borrows -Zmiri-permissive-provenance -Zmiri-ignore-leaks" \
#     cargo +nightly miri test --lib -- kernels::conv::cpu:: kernels::bezier::tests::bf16
# (Tree Borrows: crossbeam-epoch, under rayon, breaks Stacked Borrows' rules; leaks: rayon's
# pool threads are never joined), the larger ones take too long for a routine check.
#
# FLUXFLOW_NO_POISON=1 turns off the NaN fill that the unit tests otherwise give the buffers
# the kernels allocate without zeroing (`kernels::poison_uninit`): with the fill, a read of a
# never-written element reads NaN, which the tests' exact comparisons catch but which valgrind
# sees as initialised; without it, that read is a read of uninitialised heap memory, which
# valgrind reports (with --track-origins, down to the allocation).
#
# gemm picks its kernels at run time by CPUID; valgrind's CPU has no AVX-512, so it takes its
# AVX2/FMA kernels here. Usage: scripts/memcheck.sh [test filter ...] (default: the kernels'
# and the fused optimizer's tests). About 25 s under valgrind on two cores once the test
# binary is built (CI runs it right after `cargo test`, which builds it).
set -euo pipefail
cd "$(dirname "$0")/.."

filters=("$@")
if [ ${#filters[@]} -eq 0 ]; then
    filters=(kernels:: train::optim::fused::)
fi

# The lib's unit-test binary, from cargo's JSON messages: with --lib, the one artifact that has
# an executable (the lib target built in test mode).
bin=$(cargo test --release --locked --lib --no-run --message-format=json 2>/dev/null |
    grep '"reason":"compiler-artifact"' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' |
    tail -n 1)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "memcheck: no unit-test binary found" >&2
    exit 2
fi
echo "memcheck: $bin ${filters[*]}"

FLUXFLOW_NO_POISON=1 RAYON_NUM_THREADS=2 exec valgrind \
    --tool=memcheck \
    --error-exitcode=1 \
    --track-origins=yes \
    --num-callers=30 \
    "$bin" --test-threads=1 "${filters[@]}"
