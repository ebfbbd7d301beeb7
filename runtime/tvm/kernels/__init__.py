"""lpcompile's own TIR kernels, one module per family.

* :mod:`.int4_matmul` — packed int4 weights (blocked fp16/fp32 scales) × fp32/fp16/bf16 activations;
* :mod:`.fp8_matmul` — FP8 activation quantization and E4M3/E5M2 GEMM with fp32 accumulation;
* :mod:`.half_matmul` — bf16/fp16 activation rounding and GEMM with fp32 accumulation;
* :mod:`.mma` — the tensor-core GEMM on packed 32-bit words shared by the FP8 and 16-bit families;
* :mod:`.common` — storage conventions, targets and exact element codecs.

Every builder returns a ``tvm.tirx.PrimFunc`` marked scheduled and opaque (Relax neither fuses
nor reschedules it), specialised for the target: LLVM kernels are plain parallel loops that are
bit-faithful references, CUDA kernels use thread blocks, shared memory and tensor cores.
"""
