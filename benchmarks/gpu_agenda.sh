#!/usr/bin/env bash
# The GPU measurements still owed, as one background job that outlives a single 10-minute device
# call. The steps run one after another, so no benchmark shares the GPU with another:
#   0. tokprof   the synthetic_gpu proxy tokenizer for 30 steps, steps 20-24 under torch.profiler
#                (trainer.profile_start): ms per step and the GPU's busy share, after the host-sync
#                removal of 2026-12-05 (the H200 proxy stage ran ~0.3 s per step) ([G]'s cost)
#   1. pipeline  arvid pipeline configs/experiments/synthetic_gpu.yaml --jobs 2 (issue [G]: report);
#                the training stages' last metrics records (data_wait_fraction) go to train_metrics.txt
#   2. genprof   bench_generator.py --presets L --lengths router --measure-peak --profile: the
#                float32-residual baseline at 16,448 positions, then the bf16 residual stream
#                (--residual-dtype compute) at the configs' 32,768: MFU (also against the matmul peak
#                measured in the same process) and where the step's kernel time goes ([E])
#   2a. genbig   the bf16 residual at 65,536 positions (the UCF/K600 experiment configs)
#   3. attention bench_attention.py: every backend, flex[shared mask] included ([E])
#   3a. packing  bench_packing.py on the host's CPU: the generator's batch building (its stage logged
#                data_wait_fraction 0.52 on the H100, 2026-12-05, before the vectorised packing)
#   3b. fa4     where benchmarks/fa4_wheels.sh installed FlashAttention-4 into /tmp/fa4site (two
#                calls carrying .fa4/p1 and .fa4/p2, then `fa4_wheels.sh install`; the step waits a
#                minute for it): bench_attention (the fa4 backend's row, forward only on Hopper, and
#                torch's FA4 route), the attention GPU tests, and, on Blackwell only (fa4 4.0.0b3 has
#                no varlen backward on Hopper), the GPT L trained with --backend fa4 ([E])
#   4. gputests  pytest -m gpu on the tests of code changed since the last GPU run
#   5. sampling  bench_sampling.py --preset L, cuda_graph and compile, batch 1 and 64 ([F]); compile
#                makes one compilation per KV bucket (9) and batch shape: its setup_s says how long
#   6. i3d       bench_i3d.py, batch 64, clips on the device, fp32 / tf32stem-cl / tf32-cl ([B])
#   7. decode    bench_video_decode.py with the fp32 I3D, start-up and steady state apart ([B]);
#                needs PyAV: skipped (exit 3) where `import av` fails
#   8. sampling_b1  the compiled decode step at batch 1 alone, default compile mode
#   9. genflex   the GPT L with --backend flex, bf16 residual, 32,768 positions
#  9a. cudnnfe  (not in the default order; AGENDA_STEPS=cudnnfe) the cudnn_fe backend, with the
#                nvidia-cudnn-frontend wheel (1.16, cp312) carried in .whl and installed into
#                /tmp/site (PYTHONPATH): attention GPU tests, bench_attention rows torch_varlen /
#                cudnn_fe / flex, and the L step with cudnn_fe and with torch_varlen at 32,768
#                positions, then cudnn_fe at 65,536 ([E]); CUDNNFE_RUNS="BACKEND TOKENS [FLAGS];..."
#                picks other L runs
#  9b. flexsweep (not in the default order; AGENDA_STEPS=flexsweep) bench_attention's flex rows with
#                kernel options (USE_TMA, 128x64 tiles, PRESCALE_QK) and max-autotune, against
#                torch_varlen ([E])
#  9c. fused    (not in the default order; AGENDA_STEPS=fused) the fused-kernel GPU tests and the
#                L step at 65,536 positions once per FUSED_RUNS entry (bench_generator flags)
#  9d. decodek  (not in the default order; AGENDA_STEPS=decodek) the Triton decode step: its GPU tests,
#                probe_decode_kernels.py (agreement, replays, PDL at several shapes),
#                bench_decode_kernels.py (tile variants, against the compiled torch step, --profile) and
#                bench_sampling.py --modes $DECODEK_MODES (default triton,compile) at batch 1 ([F])
#  10. cudnnvar  (not in the default order; AGENDA_STEPS=cudnnvar) the cudnn_varlen backend:
#                probe_cudnn_varlen.py at 16,384 and 32,768 tokens (agreement, fwd+bwd TFLOP/s
#                against torch_varlen, the cost of new sequence counts; exit 1 when its kernels
#                disagree with the reference), the attention and GPT GPU tests (every available
#                backend), and the L step with it and with torch_varlen at 32,768 positions. Run on
#                2026-12-06 (H100, torch 2.11): wrong dq/dk, a cuDNN graph built per call; the
#                backend is refused on torch < 2.12 since. Rerun it on a newer torch.
# Measured on 2026-12-06 (H100): gputests (sampling, attention with FA4; late: every GPU test, with
# cudnn_varlen failing), sampling (compile; kv buckets 256 and 64; max-autotune-no-cudagraphs),
# sampling_b1, decode, genprof, genbig, attention, genflex, fa4 (attention rows; FA4 cannot train
# on Hopper), cudnnvar, packing (by hand: 1.95 ms a batch); cudnnfe on an H200 (22:49 UTC, before the
# padded output head; again on an H100 on 2026-12-07, 06:36-06:41 UTC, with the padded head, plan
# autotuning, compiled AdamW and 8x128 heads; and at 11:49-12:01 UTC after that day's two fixes:
# cudnn_fe L 54.2% at 65k, torch_varlen 50.5%, XL 54.7%, B 44.7% at 32k; at 14:18-15:27 UTC
# the concatenation options (no effect), the copies' source (aten::addmm) and the fused kernels:
# SwiGLU correct and faster, the first two fused-RoPE forms wrong on the GPU); fused (16:18-16:43
# UTC: the third fused-RoPE form correct, rope_pairs and the addmm split timed, presets B/L/XL at
# 32k). Still owed: tokprof, pipeline, flexsweep, and first the fused step as it stands
# (AGENDA_STEPS=fused, default FUSED_RUNS): cuDNN writing dv into d[qkv] itself
# (ARVID_CUDNN_FE_DV_IN_PLACE / --dv-in-place: its GPU test, then the L step with and without), and
# decodek (run whole 2026-12-07 23:52 UTC on an H100 for the five-kernel form, commit 2936cb4: all
# passed; owed for the layer kernel since, both launch forms: its tests, probe, the variants'
# timings with `layer=1`, and the sampler's three full runs in triton mode). Not yet tried on the
# training step: FUSED_RUNS="--compile-mode max-autotune-no-cudagraphs" (inductor may take Triton
# matmul templates with the RMSNorm/SwiGLU work fused in; its autotuning adds minutes: one run a call).
# Nor L with head size 128 (FUSED_RUNS="--gpt n_heads=8"): cuDNN's attention takes ~49 ms of the
# 287.7 ms step at head size 64; Hopper attention kernels run closer to peak at 128 (a preset change
# to weigh only after the measurement: same parameters and FLOPs, other heads).
#
#   benchmarks/gpu_agenda.sh start [RESULTS]        start in the background (setsid) and return
#   benchmarks/gpu_agenda.sh wait  [RESULTS] [SECS]  wait until it finishes or SECS pass (default
#                                                     550), then print each step's state and log tail
#   benchmarks/gpu_agenda.sh run   [RESULTS]        run in the foreground
#
# RESULTS (default /tmp/agenda) gets <step>.log, <step>.rc (exit status, written when the step
# ends), the benchmarks' JSON and the pipeline's report.md / metrics.json. The weights come from
# $ARVID_WEIGHTS_DIR (the lent machine has neither weight package). Set AGENDA_STEPS to run a subset,
# e.g. AGENDA_STEPS="sampling i3d". SAMPLING_MODES (default cuda_graph,compile) and DECODE_WORKERS
# (default 0,4,8,15) narrow the sampling and decode steps when device time is short; DECODE_ATTENTION
# (default sdpa,flex) the compiled decode step's attentions; KV_BUCKET (default 64, the sampler's
# default since 2026-12-06) its bucket; COMPILE_MODE (default `default`) its torch.compile mode
# (`max-autotune-no-cudagraphs` tries Triton matmul templates for the 2-row matmuls; on 2026-12-06
# it was no faster at batch 1 and slower at batch 64).
#
# On the lent machine (64 MiB carried per call): the weights (58 MB) and the PyAV wheel (36 MB)
# do not travel together. Copy the weights out of the checkout in a first call (`cp -r .wts
# /tmp/wts`, carrying .wts), then carry .whl in the next call and install PyAV into /tmp/site; files
# outside the checkout stay while the machine is warm. Set ARVID_WEIGHTS_DIR=/tmp/wts.
set -uo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-run}
R=${2:-/tmp/agenda}
STEPS=${AGENDA_STEPS:-tokprof pipeline genprof genbig attention packing fa4 gputests sampling sampling_b1 i3d decode genflex}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

step() {  # step NAME TIMEOUT_S COMMAND...: one step, its log and exit status in $R
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $(date -u +%FT%TZ) $*" > "$R/$name.log"
    timeout "$limit" "$@" >> "$R/$name.log" 2>&1
    echo $? > "$R/$name.rc"
}

run_all() {
    mkdir -p "$R"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/device.txt" 2>&1
    # cudnnvar: each part runs whatever the others did; the step's status is the first failure's
    step cudnnvar 600 bash -c '
        rc=0
        python3 benchmarks/probe_cudnn_varlen.py --json "$1/cudnn_varlen.json" || rc=$?
        python3 benchmarks/probe_cudnn_varlen.py --tokens 32768 --json "$1/cudnn_varlen_32k.json" \
            || { s=$?; [ $rc = 0 ] && rc=$s; }
        python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_generator_attention.py \
            tests/test_generator_gpt.py || { s=$?; [ $rc = 0 ] && rc=$s; }
        for b in cudnn_varlen torch_varlen; do  # the L step with it, and the baseline on this machine
            python3 benchmarks/bench_generator.py --presets L --lengths router --steps 6 --warmup 3 \
                --backend $b --residual-dtype compute --max-tokens 32768 --measure-peak --profile \
                --json "$1/generator_$b.json" || { s=$?; [ $rc = 0 ] && rc=$s; }
        done
        exit $rc' _ "$R"
    # decodek: (not in the default order; AGENDA_STEPS=decodek) the Triton decode step
    # (arvid/generator/decode_kernels.py): its GPU tests, then its captured step against the compiled
    # torch step at 2 rows (batch 1 with guidance) over DECODEK_VARIANTS tile sizes, then the sampler
    # at batch 1 with compile=triton and compile=compile (samples/s, floor, vs recompute)
    step decodek 590 bash -c '
        rc=0
        python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_generator_decode_kernels.py -rA \
            > "$1/decodek_tests.log" 2>&1 || rc=$?
        grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$1/decodek_tests.log"
        # a failed test does not stop the timings (a form that fails is timed, not claimed): its lines first
        [ $rc = 0 ] || grep -E "^E " "$1/decodek_tests.log" | head -40
        python3 benchmarks/probe_decode_kernels.py || { s=$?; [ $rc = 0 ] && rc=$s; }
        python3 benchmarks/bench_decode_kernels.py --preset L --rows 2 --fill 797 --kv-len 832 --torch --profile \
            --variants "${DECODEK_VARIANTS:-default;layer=1;layer=1,pdl=0;layer=1,layer_warps=8;layer=1,layer_programs=264,layer_warps=2;layer=1,programs=128,o_n=8,down_n=8;layer=1,programs=128,qkv_p=8,o_n=8,down_n=8,up_n=16,layer_warps=8;up_k=1024}" \
            --json "$1/decode_kernels.json" || { s=$?; [ $rc = 0 ] && rc=$s; }
        python3 benchmarks/bench_sampling.py --preset L --modes "${DECODEK_MODES:-triton,compile}" --batch-sizes 1 --full-runs "${DECODEK_FULL_RUNS:-3}" \
            --kv-bucket "${KV_BUCKET:-64}" --json "$1/sampling_triton.json" || { s=$?; [ $rc = 0 ] && rc=$s; }
        exit $rc' _ "$R"
    # fused: (not in the default order; AGENDA_STEPS=fused) the hand-written RoPE/SwiGLU kernels
    # (arvid/generator/fused.py) and the residual-addmm split (arvid/training/graph_passes.py) with
    # the cudnn_fe backend (wheel as in cudnnfe): their GPU tests, then the L step at 65,536 positions
    # once per FUSED_RUNS entry (bench_generator flags, ";"-separated), one after another on this
    # machine; runs that use the fused RoPE only if its GPU test passed, --dv-in-place runs only if
    # that form's did. fused_tests.rc is the tests' status
    step fused 1500 bash -c '
        set -o pipefail
        rc=0
        python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_generator_fused.py \
            tests/test_generator_attention.py -k "fused or rope or cudnn_fe or backends_match" -rA \
            > "$1/fused_tests.log" 2>&1; t=$?
        python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_training_graph_passes.py -rA \
            >> "$1/fused_tests.log" 2>&1 || { [ $t = 0 ] && t=1; }
        echo $t > "$1/fused_tests.rc"; grep -E "^(PASSED|FAILED|ERROR)" "$1/fused_tests.log"
        rope_ok=0; grep -q "PASSED.*test_gpu_cudnn_fe_rope_matches_the_plain_route\[False\]" "$1/fused_tests.log" && rope_ok=1
        dv_ok=0; grep -q "PASSED.*test_gpu_cudnn_fe_rope_matches_the_plain_route\[True\]" "$1/fused_tests.log" && dv_ok=1
        IFS=";" read -ra runs <<< "${FUSED_RUNS:---dv-in-place --profile;--fused default}"
        i=0
        for run in "${runs[@]}"; do
            i=$((i + 1))
            case " $run " in  # runs that use the fused RoPE (on by default) need its test passed
                *" --fused off "*|*" --fused swiglu "*) ;;
                *) [ $rope_ok = 1 ] || { echo "--- run $i skipped (fused RoPE failed its test): $run"; continue; } ;;
            esac
            case " $run " in *" --dv-in-place "*)
                [ $dv_ok = 1 ] || { echo "--- run $i skipped (dv in place failed its test): $run"; continue; } ;;
            esac
            echo "--- run $i: $run"
            python3 benchmarks/bench_generator.py --presets L --lengths router --steps 6 --warmup 3 \
                --backend cudnn_fe --residual-dtype compute --max-tokens 65536 --measure-peak \
                --optimizer compiled $run --json "$1/generator_fused_$i.json" | grep -v "^row\|^{" \
                || { s=$?; [ $rc = 0 ] && rc=$s; }
        done
        [ $t = 0 ] || rc=$t
        exit $rc' _ "$R"
    # cudnnfe: the cudnn_fe backend (cuDNN frontend graphs; the calling command installs its wheel
    # into /tmp/site and puts that on PYTHONPATH, see 9a above): the attention and GPT GPU tests,
    # the attention rows against torch_varlen, and the L runs of CUDNNFE_RUNS
    step cudnnfe 590 bash -c '
        rc=0
        python3 -c "import torch, cudnn; print(\"cudnn frontend\", cudnn.__version__, \"backend\", cudnn.backend_version())"
        python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_generator_attention.py -k "cudnn_fe or backends_match" \
            || rc=$?
        python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_generator_gpt.py tests/test_generator_fused.py \
            || { s=$?; [ $rc = 0 ] && rc=$s; }
        python3 benchmarks/bench_attention.py --only torch_varlen --only cudnn_fe --only "flex[shared mask]" \
            --json "$1/attention_cudnn_fe.json" || { s=$?; [ $rc = 0 ] && rc=$s; }
        IFS=";" read -ra runs <<< "${CUDNNFE_RUNS:-cudnn_fe 32768 --profile;torch_varlen 32768;cudnn_fe 65536}"
        i=0
        for run in "${runs[@]}"; do  # FLAGS may name another preset (--presets XL: the last one counts)
            set -- "$1" $run
            i=$((i + 1))
            echo "--- run $i: $run"
            python3 benchmarks/bench_generator.py --presets L --lengths router --steps 6 --warmup 3 \
                --backend $2 --residual-dtype compute --max-tokens $3 --measure-peak "${@:4}" \
                --json "$1/generator_${i}_$2_$3.json" || { s=$?; [ $rc = 0 ] && rc=$s; }
        done
        exit $rc' _ "$R"
    rm -rf /tmp/tokprof  # a rerun on the same machine must profile again, not skip a finished stage
    step tokprof 300 python3 -m arvid pipeline configs/experiments/synthetic_gpu.yaml --until proxy \
        out_dir=/tmp/tokprof proxy.trainer.max_steps=30 proxy.trainer.profile_start=20 \
        proxy.trainer.checkpoint_every=0
    cp /tmp/tokprof/proxy/profile.txt "$R/tokenizer_profile.txt" 2>/dev/null
    step pipeline 1500 python3 -m arvid pipeline configs/experiments/synthetic_gpu.yaml --jobs 2
    cp outputs/synthetic_gpu/report/report.md outputs/synthetic_gpu/report/metrics.json "$R/" 2>/dev/null
    for m in outputs/synthetic_gpu/*/metrics.jsonl; do  # each training stage's last logged record
        [ -f "$m" ] && echo "$m $(tail -n 1 "$m")"
    done > "$R/train_metrics.txt" 2>/dev/null
    # genprof: the float32-residual baseline at 16,448 positions, then the bf16 residual stream at the
    # configs' 32,768 positions; each row also has MFU against the matmul peak measured in the same
    # process (--measure-peak: the issue's MFU); genflex (last) runs flex
    step genprof 600 bash -c "python3 benchmarks/bench_generator.py --presets L --lengths router --steps 6 \
        --warmup 3 --measure-peak --profile --json '$R/generator.json' && python3 benchmarks/bench_generator.py \
        --presets L --lengths router --steps 6 --warmup 3 --residual-dtype compute --max-tokens 32768 \
        --measure-peak --profile --json '$R/generator_bf16res.json'"
    # genbig: the bf16 residual at the 65,536 positions of the UCF/K600 experiment configs (the
    # optimizer's fixed cost spread over twice the tokens)
    step genbig 400 python3 benchmarks/bench_generator.py --presets L --lengths router --steps 6 --warmup 3 \
        --residual-dtype compute --max-tokens 65536 --measure-peak --json "$R/generator_65k.json"
    step attention 300 python3 benchmarks/bench_attention.py --json "$R/attention.json"
    # flexsweep: FlexAttention's kernel options on the packed batch, against torch_varlen (not in the
    # default order; AGENDA_STEPS=flexsweep): TMA, larger tiles, the prescaled q, max-autotune
    step flexsweep 300 python3 benchmarks/bench_attention.py --only torch_varlen --only "flex[shared mask]" \
        --only "flex*" --flex-options '{"USE_TMA":true}' \
        --flex-options '{"BLOCK_M":128,"BLOCK_N":64,"num_warps":8,"num_stages":3}' \
        --flex-options '{"PRESCALE_QK":true}' --flex-modes max-autotune-no-cudagraphs \
        --json "$R/attention_flexsweep.json"
    step packing 120 python3 benchmarks/bench_packing.py --json "$R/packing.jsonl"
    case " $STEPS " in *" fa4 "*)
        for _ in $(seq 12); do [ -d /tmp/fa4site/flash_attn ] && break; sleep 5; done ;;
    esac
    if [ -d /tmp/fa4site/flash_attn ]; then
        # each part runs whatever the others did; the step's status is the first failure's
        step fa4 600 env PYTHONPATH="$(cat /tmp/fa4site/PYTHONPATH 2>/dev/null || echo /tmp/fa4site):$PYTHONPATH" bash -c '
            rc=0
            python3 benchmarks/bench_attention.py --json "$1/attention_fa4.json" || rc=$?
            # training with fa4 needs its varlen backward: Blackwell (compute capability >= 10) only
            if python3 -c "import sys, torch; sys.exit(torch.cuda.get_device_capability()[0] < 10)"; then
                python3 benchmarks/bench_generator.py --presets L --lengths router --steps 6 --warmup 3 \
                    --backend fa4 --residual-dtype compute --max-tokens 32768 \
                    --measure-peak --profile --json "$1/generator_fa4.json" || { s=$?; [ $rc = 0 ] && rc=$s; }
            fi
            python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_generator_attention.py \
                || { s=$?; [ $rc = 0 ] && rc=$s; }
            exit $rc' _ "$R"
    else
        case " $STEPS " in *" fa4 "*)
            echo "FlashAttention-4 is not installed in /tmp/fa4site: fa4 skipped" > "$R/fa4.log"; echo 3 > "$R/fa4.rc" ;;
        esac
    fi
    step gputests 420 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_generator_attention.py \
        tests/test_generator_gpt.py tests/test_sampling_gpu.py tests/test_tokenizer_attention.py \
        tests/test_training_gpu.py
    step sampling 900 python3 benchmarks/bench_sampling.py --preset L --modes "${SAMPLING_MODES:-cuda_graph,compile}" \
        --batch-sizes 1,64 --full-runs 1 --decode-attention "${DECODE_ATTENTION:-sdpa,flex}" \
        --kv-bucket "${KV_BUCKET:-64}" --compile-mode "${COMPILE_MODE:-default}" --profile \
        --json "$R/sampling.json"
    # the default compile mode at batch 1 alone (the batch is static in the compiled step since
    # 2026-12-06; the last batch-1 timing most likely ran a symbolic batch)
    step sampling_b1 400 python3 benchmarks/bench_sampling.py --preset L --modes compile --batch-sizes 1 \
        --full-runs 0 --decode-attention sdpa --kv-bucket "${KV_BUCKET:-64}" --json "$R/sampling_b1.json"
    step i3d 300 python3 benchmarks/bench_i3d.py --batch 64 --iters 8 --clips-on device \
        --modes fp32,tf32stem-cl,tf32-cl --json "$R/i3d.json"
    if python3 -c "import av" 2> /dev/null; then
        step decode 420 python3 benchmarks/bench_video_decode.py --videos 96 --passes 8 --workers "${DECODE_WORKERS:-0,4,8,15}" \
            --batch 8 --i3d cuda --i3d-batch 32 --i3d-clips-per-s 441 --out "$R/decode.jsonl"
    else
        case " $STEPS " in *" decode "*)
            echo "PyAV is not installed: decode skipped" > "$R/decode.log"; echo 3 > "$R/decode.rc" ;;
        esac
    fi
    step genflex 400 python3 benchmarks/bench_generator.py --presets L --lengths router --steps 6 --warmup 3 \
        --backend flex --residual-dtype compute --max-tokens 32768 --measure-peak --json "$R/generator_flex.json"
    date -u +%FT%TZ > "$R/finished"
}

case $cmd in
    run) run_all ;;
    start)
        case " $STEPS " in *" tokprof "*|*" pipeline "*)
            # both train with an LPIPS loss: without the weights they fail at once (a fresh machine
            # has none; carry .wts and copy it out, see above)
            if [ ! -f "${ARVID_WEIGHTS_DIR:-/nonexistent}/lpips-alexnet-v0.1.safetensors" ]; then
                echo "ARVID_WEIGHTS_DIR=${ARVID_WEIGHTS_DIR:-} has no lpips-alexnet-v0.1.safetensors: tokprof and" \
                     "pipeline would fail; carry .wts and set ARVID_WEIGHTS_DIR" >&2
                exit 5
            fi ;;
        esac
        mkdir -p "$R"
        setsid nohup "$0" run "$R" > "$R/agenda.out" 2>&1 < /dev/null &
        echo "started (pid $!); results in $R" ;;
    wait)
        secs=${3:-550}
        if [ ! -d "$R" ]; then  # a fresh machine (the last one was given back): nothing to wait for
            echo "no $R on this machine: the agenda was never started here (fresh machine?)" >&2
            exit 4
        fi
        end=$((SECONDS + secs))
        while [ ! -f "$R/finished" ] && [ $SECONDS -lt $end ]; do sleep 5; done
        for s in $STEPS; do
            if [ -f "$R/$s.rc" ]; then st="exit $(cat "$R/$s.rc")"
            elif [ -f "$R/$s.log" ]; then st="running"
            else st="not started"; fi
            echo "--- $s: $st"
            [ -f "$R/$s.log" ] && grep -v "it/s\]\|video/s\]" "$R/$s.log" | tail -n 6 | cut -c1-300
        done
        [ -f "$R/finished" ] && echo "agenda finished $(cat "$R/finished")" ;;
    *) echo "usage: $0 start|wait|run [RESULTS] [SECS]" >&2; exit 2 ;;
esac
