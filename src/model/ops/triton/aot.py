#!/usr/bin/env python3
"""Compiles our Triton kernels ahead of time to cubins, on a machine without a GPU, for the CUDA
build to embed: every kernel of `KERNELS`, in every variant, for every GPU architecture asked.

    python3 src/model/ops/triton/aot.py --out DIR [--archs 80,90]

Writes DIR/<kernel>-<variant>-sm<arch>.cubin, DIR/kernels.json and DIR/triton_kernels.rs (the
same table as Rust, with the cubins embedded by `include_bytes!`; `build.rs` includes it in a
CUDA build), one entry per cubin: the
kernel, variant, architecture, file, the launch parameters the cubin was compiled for (threads
per block = 32 x num_warps, dynamic shared memory in bytes) and its parameters in order: the
kernel's own (name and type), then the scratch pointers Triton appends (two in Triton 3.9), as
the compiled PTX's entry declares them. The launch code (`src/model/ops/triton.rs`) takes the
threads, shared memory and tile sizes from that table, so they cannot disagree with what was
compiled, and checks at compile time that the arguments it pushes are the parameter list.

Cubins, not PTX: a cubin needs no JIT on the GPU machine, and the PTX of a newer toolchain may be
too new for its driver. Triton is pinned (TRITON_VERSION); any other version is refused.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

TRITON_VERSION = "3.9.0"

sys.path.insert(0, str(Path(__file__).resolve().parent))


def kernels():
    """(kernel, variant, signature, constexprs, options) for every cubin, any architecture."""
    import adam
    import bsfa
    import causal_attention as ca
    import cross_entropy as ce
    import rms_norm as rn
    import swiglu as sg

    out = []
    for dtype in ("bf16", "fp32"):
        for full in (64, 128):
            variant = f"{dtype}-d{full}"
            tiles = dict(HALF=full // 2, FULL=full, IEEE=dtype == "fp32",
                         BLOCK_M=ca.BLOCK_M, BLOCK_N=ca.BLOCK_N)
            # One stage in f32: two would need up to 213 KB of shared memory at d128, more
            # than an A100 has (163 KB).
            options = dict(num_warps=4 if full == 64 else 8, num_stages=2 if dtype == "bf16" else 1)
            ptr = f"*{dtype}"
            shape = dict(seq="i32", heads="i32", kv_heads="i32", dim="i32")
            out.append((ca.attention_forward, variant, dict(
                qkv=ptr, cos=ptr, sin=ptr, out=ptr, lse="*fp32", **shape, scale="fp32"),
                tiles, options))
            out.append((ca.attention_delta, variant, dict(
                out=ptr, d_out=ptr, delta="*fp32", seq="i32", heads="i32", dim="i32"),
                dict(FULL=full, BLOCK_M=ca.BLOCK_M), dict(num_warps=4, num_stages=1)))
            for fn in (ca.attention_dkdv, ca.attention_dq):
                out.append((fn, variant, dict(
                    qkv=ptr, cos=ptr, sin=ptr, d_out=ptr, lse="*fp32", delta="*fp32",
                    d_qkv=ptr, **shape, scale="fp32"), tiles, options))
    for dtype in ("bf16", "fp32"):
        ptr = f"*{dtype}"
        block = dict(BLOCK_V=ce.BLOCK_V)
        options = dict(num_warps=8)
        out.append((ce.row_logsumexp, dtype, dict(logits=ptr, lse="*fp32", vocab="i32"),
                    block, options))
        out.append((ce.softmax_gradient, dtype, dict(
            logits=ptr, lse="*fp32", targets="*u32", vocab="i32", scale="fp32"), block, options))
        rows = dict(BLOCK=rn.BLOCK)
        options = dict(num_warps=4)
        # The weight is f32 in every variant: LLaMA normalises bf16 rows with f32 weights.
        out.append((rn.rms_norm_forward, dtype, dict(x=ptr, w="*fp32", y=ptr, n="i32",
                                                     eps="fp32"), rows, options))
        out.append((rn.rms_norm_dx, dtype, dict(x=ptr, w="*fp32", dy=ptr, dx=ptr, n="i32",
                                                eps="fp32"), rows, options))
        out.append((rn.add_rms_norm_forward, dtype, dict(
            x=ptr, delta=ptr, w="*fp32", s=ptr, y=ptr, n="i32", eps="fp32"), rows, options))
        out.append((rn.rms_norm_dx_add, dtype, dict(
            x=ptr, w="*fp32", dy=ptr, residual=ptr, dx=ptr, n="i32", eps="fp32"), rows, options))
        out.append((rn.rms_norm_dw, dtype, dict(
            x=ptr, dy=ptr, dw_part="*fp32", rows="i32", n="i32", eps="fp32"),
            dict(BLOCK=rn.BLOCK, ROWS=rn.ROWS), options))
        block = dict(BLOCK=sg.BLOCK)
        out.append((sg.swiglu_forward, dtype, dict(gu=ptr, y=ptr, inter="i32"), block, options))
        out.append((sg.swiglu_backward, dtype, dict(gu=ptr, dy=ptr, d_gu=ptr, inter="i32"),
                    block, options))
    # The optimizer, multi-tensor: f32 only (parameters and moments are f32 in every run); no
    # fused multiply-adds, so that AdamW's update is the CPU op's arithmetic operation for
    # operation. The tensors are reached through the int64 addresses of `pointers`.
    hyper = dict(beta1="fp32", beta2="fp32", eps="fp32", keep="fp32", step="fp32",
                 inv_bias2="fp32", grad_scale="fp32")
    options = dict(num_warps=4, enable_fp_fusion=False)
    tables = dict(pointers="*i64", tensors="i32", owner="*i32", first="*i32", sizes="*i64")
    out.append((adam.adamw_multi, "fp32", dict(**tables, decays="*i32", **hyper),
                dict(BLOCK=adam.BLOCK), options))
    out.append((adam.adam_mini_multi, "fp32", dict(**tables, blocks="*i32", inv_blocks="*fp32",
                                                    decays="*i32", **hyper),
                dict(BLOCK=adam.BLOCK), options))
    out.append((adam.sum_squares_multi, "fp32", dict(pointers="*i64", owner="*i32",
                                                      first="*i32", sizes="*i64",
                                                      part="*fp64"),
                dict(BLOCK=adam.BLOCK, STEPS=adam.STEPS), dict(num_warps=4)))
    # BSFA's projection over every block: f32, tables of device addresses as int64.
    tiles = dict(K=bsfa.K, CHUNK=bsfa.CHUNK, COLS=bsfa.COLS, SEARCH=bsfa.SEARCH)
    tables = dict(numel="*i64", offset="*i64", rank="*i32", first="*i32")
    options = dict(num_warps=4)
    out.append((bsfa.bsfa_coordinates, "fp32", dict(
        after="*i64", before="*i64", directions="*i64", **tables, update=ptr, parts=ptr,
        blocks="i32"), tiles, options))
    out.append((bsfa.bsfa_coordinate_sum, "fp32", dict(
        parts=ptr, first="*i32", coordinates=ptr, scale="fp32"), dict(K=bsfa.K), options))
    out.append((bsfa.bsfa_apply, "fp32", dict(
        after="*i64", directions="*i64", **tables, update=ptr, coordinates=ptr, blocks="i32",
        gamma_minus_one="fp32"), tiles, options))
    return out


def entry_params(ptx, name):
    """The number of parameters of `name`'s `.entry` in `ptx`."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise SystemExit(f"no .entry {name} in the PTX")
    return len(re.findall(r"\.param\b", m.group(1)))


def compile_all(out_dir, archs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.__version__ != TRITON_VERSION:
        raise SystemExit(f"triton {triton.__version__}: the kernels are built with triton=="
                         f"{TRITON_VERSION} (pip install triton=={TRITON_VERSION})")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for fn, variant, signature, constexprs, options in kernels():
        name = fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__
        for arch in archs:
            source = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                               constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            meta = compiled.metadata
            file = f"{name}-{variant}-sm{arch}.cubin"
            (out_dir / file).write_bytes(compiled.asm["cubin"])
            params = [{"name": k, "type": t} for k, t in signature.items()]
            scratch = entry_params(compiled.asm["ptx"], meta.name) - len(params)
            if scratch < 0:
                raise SystemExit(f"{file}: the PTX entry has fewer parameters than the kernel")
            params += [{"name": f"scratch{i}", "type": "*i8"} for i in range(scratch)]
            entries.append({
                "kernel": name, "variant": variant, "arch": arch, "file": file,
                "function": meta.name, "threads": 32 * meta.num_warps, "shared": meta.shared,
                "global_scratch_size": meta.global_scratch_size,
                "profile_scratch_size": getattr(meta, "profile_scratch_size", 0),
                "params": params,
            })
            print(f"[aot] {file}: {32 * meta.num_warps} threads, {meta.shared} B shared, "
                  f"{len(params)} parameters", file=sys.stderr, flush=True)
    (out_dir / "kernels.json").write_text(json.dumps(entries, indent=1) + "\n")
    (out_dir / "triton_kernels.rs").write_text(rust(entries, out_dir))
    return entries


def rust(entries, out_dir):
    """The table as Rust: per kernel its parameter names (the same in every variant), the tile
    sizes, and every cubin."""
    import adam
    import bsfa
    import causal_attention as ca
    import rms_norm as rn
    import swiglu as sg

    lines = ["// Generated by src/model/ops/triton/aot.py from the compiled kernels: do not edit.",
             "/// Query rows per tile of the attention kernels (`BLOCK_M`).",
             f"pub const ATTENTION_BLOCK_M: u32 = {ca.BLOCK_M};",
             "/// Keys per tile of the attention kernels (`BLOCK_N`).",
             f"pub const ATTENTION_BLOCK_N: u32 = {ca.BLOCK_N};",
             "/// Columns per program of the RMSNorm kernels (`BLOCK`).",
             f"pub const RMS_NORM_BLOCK: u32 = {rn.BLOCK};",
             "/// Rows per program of `rms_norm_dw` (`ROWS`).",
             f"pub const RMS_NORM_ROWS: u32 = {rn.ROWS};",
             "/// Columns per program of the SwiGLU kernels (`BLOCK`).",
             f"pub const SWIGLU_BLOCK: u32 = {sg.BLOCK};",
             "/// Elements per program of `adamw_multi`, and per chunk of `adam_mini_multi`.",
             f"pub const ADAM_BLOCK: u32 = {adam.BLOCK};",
             "/// Elements per program (one f64 part) of `sum_squares_multi` (`BLOCK * STEPS`).",
             f"pub const SUM_SQUARES_PER_PROGRAM: u32 = {adam.BLOCK * adam.STEPS};",
             "/// Directions per block the BSFA projection kernels take at most (`K`).",
             f"pub const BSFA_K: usize = {bsfa.K};",
             "/// Values per program of the BSFA projection kernels (`CHUNK`).",
             f"pub const BSFA_CHUNK: u32 = {bsfa.CHUNK};"]
    params = {}
    for e in entries:
        names = [p["name"] for p in e["params"]]
        if params.setdefault(e["kernel"], names) != names:
            raise SystemExit(f"{e['file']}: its parameters differ from another variant's")
    for kernel, names in params.items():
        quoted = ", ".join(f'"{n}"' for n in names)
        lines += [f"/// The parameters of `{kernel}`, in order, Triton's scratch pointers last.",
                  f"pub const {kernel.upper()}_PARAMS: &[&str] = &[{quoted}];"]
    lines.append("/// Every compiled kernel.")
    lines.append("pub static CUBINS: &[Cubin] = &[")
    for e in entries:
        image = json.dumps(str((out_dir / e["file"]).resolve()))
        lines.append(
            f'    Cubin {{ kernel: "{e["kernel"]}", variant: "{e["variant"]}", arch: {e["arch"]}, '
            f'function: "{e["function"]}", threads: {e["threads"]}, shared: {e["shared"]}, '
            f'scratch: {e["global_scratch_size"] + e["profile_scratch_size"]}, '
            f"image: include_bytes!({image}) }},")
    lines.append("];")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--archs", default=os.environ.get("BSFA_TRITON_ARCHS", "80,90"),
                        help="compute capabilities, e.g. 80,90 (default: $BSFA_TRITON_ARCHS or 80,90)")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    compile_all(args.out, [int(a) for a in args.archs.split(",")])


if __name__ == "__main__":
    main()
