"""Every Triton kernel compiled for a GPU on a machine without one: registers, spills, shared memory.

Triton compiles a kernel for an NVIDIA target with its own bundled ptxas whether or not a GPU is
present (triton.compile with GPUTarget("cuda", 80 | 90, 32)), and the wheel's cuobjdump reads the
resources of the binary. kernels.py, kernels_train.py and attention.py list the launches the
engine makes (their kernel_variants); this file compiles them, typed as the engine launches them.
Demo: `python kernel_bench.py --compile` (the LoRA kernels), `python attention.py` (attention).
"""
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_for(kernel, dtype, constexprs, arch):
    """(registers, local-memory bytes: spills, shared-memory bytes) of the kernel compiled for
    sm_{arch} by Triton's own ptxas (no GPU needed), typed as the engine launches it."""
    if os.environ.get("TRITON_INTERPRET") == "1":   # the interpreter replaces the kernels
        raise RuntimeError("compiling for a GPU needs TRITON_INTERPRET unset")
    types = {**{a: "*fp32" for a in ("z_ptr", "u_ptr", "grad_ptr", "scales_ptr", "row_scale_ptr")},
             **{a: "*" + TRITON_TYPES[dtype] for a in ("x_ptr", "v_ptr", "pool_ptr", "out_ptr",
                                                       "q_ptr")}, "sm_scale": "fp32"}
    if constexprs.get("INT8"):
        types["pool_ptr"] = "*i8"
    signature = {a: types.get(a, "*i32" if a.endswith("_ptr") else "i32") for a in kernel.arg_names}
    signature.update((a, "constexpr") for a in constexprs)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", arch, 32))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|LOCAL):(\d+)", usage))
    return int(found["REG"]), int(found["LOCAL"]), compiled.metadata.shared


def print_compiled(variants):
    """One line per variant: registers, spilled bytes and shared memory for sm_80 and sm_90."""
    for label, dtype, kernel, constexprs in variants:
        cells = [compile_for(kernel, dtype, constexprs, arch) for arch in (80, 90)]
        print(f"{label:<42} {TRITON_TYPES[dtype]:<5}"
              + "".join(f" | sm_{a}: regs {r:>3d} spill {s:>3d} smem {m:>6d}"
                        for a, (r, s, m) in zip((80, 90), cells)))
