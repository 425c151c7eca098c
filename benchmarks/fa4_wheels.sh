#!/usr/bin/env bash
# FlashAttention-4 (PyPI package `fa4`: flash_attn/cute, CuTe DSL kernels for Hopper and Blackwell)
# for the lent GPU machine, which has no registry access and takes at most 64 MiB per call.
# arvid uses it as `attn_backend: fa4` (its varlen kernels, called directly; training needs
# Blackwell: fa4 4.0.0b3 has no varlen backward on Hopper), and torch >= 2.10 routes its own flash
# kernels (torch.nn.attention.varlen, SDPA's flash path) to it after
# `activate_flash_attention_impl("FA4")` (`flash_impl: FA4`); bench_attention.py has rows for both.
#
# The wheels are ~76 MB (one of them, the CuTe DSL's libs-base with its compiler, 71 MB), so they
# travel in two calls to the same warm machine and are joined there:
#   benchmarks/fa4_wheels.sh fetch     here: download into .fa4/ and split into .fa4/p1 (the small
#                                      wheels + the first half) and .fa4/p2 (the second half)
#   benchmarks/fa4_wheels.sh stash     there, in each call that carries .fa4/p1 or .fa4/p2: copy the
#                                      parts to /tmp/fa4parts (outside the checkout: they stay while
#                                      the machine is warm)
#   benchmarks/fa4_wheels.sh install   there, once both parts are stashed: join, check the sha256,
#                                      install into /tmp/fa4site and write /tmp/fa4site/PYTHONPATH:
#                                      the site plus the folders its .pth files add (a --target
#                                      install's .pth files are not read from PYTHONPATH; the CuTe
#                                      DSL's `cutlass` package lives in such a folder); use
#                                      PYTHONPATH=$(cat /tmp/fa4site/PYTHONPATH):...
# The machine already has cuda-bindings, protobuf, einops and typing-extensions.
# .fa4/ must be ignored by git (`echo /.fa4/ >> .git/info/exclude`).
set -euo pipefail
cd "$(dirname "$0")/.."
# One coherent set of March 2026 (fa4 4.0.0b3 was built on 2026-03-05): CuTe DSL 4.4.2 and quack
# 0.3.2. The newest CuTe DSL (4.8.1) moved `cute.core.ThrMma`, which fa4 4.0.0b3 names, and quack
# >= 0.6 needs CuTe DSL >= 4.7 (2026-12-06: FA4 failed to import on the H100 with 4.8.1). 4.4.2's
# libs-base carries its own CUDA 12 compiler libraries (the 580 driver runs them); no cu13 extra.
BIG=nvidia_cutlass_dsl_libs_base-4.4.2-cp312-cp312-manylinux_2_28_x86_64.whl
SPECS=(fa4==4.0.0b3 nvidia-cutlass-dsl==4.4.2 nvidia-cutlass-dsl-libs-base==4.4.2
       "apache-tvm-ffi>=0.1.6,<0.2" torch-c-dlpack-ext quack-kernels==0.3.2)
STASH=/tmp/fa4parts
SITE=/tmp/fa4site

case ${1:-} in
    fetch)
        rm -rf .fa4 && mkdir -p .fa4/all .fa4/p1 .fa4/p2
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .fa4/all "${SPECS[@]}"
        (cd .fa4/all && sha256sum "$BIG" > ../p1/big.sha256)
        split -n 2 -d ".fa4/all/$BIG" .fa4/big.part
        mv .fa4/big.part00 .fa4/p1/ && mv .fa4/big.part01 .fa4/p2/
        find .fa4/all -name '*.whl' ! -name "$BIG" -exec mv {} .fa4/p1/ \;
        rm -rf .fa4/all
        du -sh .fa4/p1 .fa4/p2 ;;
    stash)
        mkdir -p "$STASH"
        # plain cp (the same bytes again): `cp -n` exits 1 on a skipped file in coreutils 9.2-9.4
        for d in .fa4/p1 .fa4/p2; do if [ -d "$d" ]; then cp "$d"/* "$STASH"/; fi; done
        ls "$STASH" ;;
    install)
        [ -f "$STASH/big.part00" ] && [ -f "$STASH/big.part01" ] || { echo "parts missing in $STASH" >&2; exit 3; }
        mkdir -p /tmp/fa4whl && cp "$STASH"/*.whl /tmp/fa4whl/
        cat "$STASH/big.part00" "$STASH/big.part01" > "/tmp/fa4whl/$BIG"
        (cd /tmp/fa4whl && sha256sum -c "$STASH/big.sha256")
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            /tmp/fa4whl/*.whl
        python3 - "$SITE" > "$SITE/PYTHONPATH" <<'PY'
import site, sys
before = list(sys.path)
site.addsitedir(sys.argv[1])
print(":".join([sys.argv[1]] + [p for p in sys.path if p not in before and p != sys.argv[1]]))
PY
        cat "$SITE/PYTHONPATH"
        PYTHONPATH=$(cat "$SITE/PYTHONPATH") python3 -c "import flash_attn.cute.interface; print('fa4 importable')" ;;
    *) echo "usage: $0 fetch|stash|install" >&2; exit 2 ;;
esac
