"""Apache TVM lowering of rewritten (mixed-precision) ONNX models, for CUDA and LLVM.

Public API (TVM is imported lazily; ``pip install 'lpcompile[tvm]'``):

* :func:`lpcompile.runtime.tvm.build.lower_model` — ``model.lp.onnx`` → ``OUT.so`` +
  ``OUT.so.meta.json`` (the CLI's ``lpcompile lower``); :func:`~.build.load_compiled` /
  :func:`~.build.run_compiled` run one (``lpcompile run``); :func:`~.build.compile_model` compiles
  in memory; :func:`~.build.reference_outputs` is ORT on the graph as written.
* :mod:`.patterns` — finds the quantized patterns the passes emit and cuts them out;
  :mod:`.relax_import` — builds the Relax module (TVM's ONNX frontend for ordinary ops,
  ``call_tir`` to lpcompile's kernels for quantized ones, the two-pass softmax kernel of
  :mod:`.softmax`); :mod:`.kernels` — the TIR kernels; :mod:`.cuda_tools` — nvcc / nvdisasm and
  PTX/SASS inspection; :mod:`.kernel_suite` — fixed kernel instances for tests and benchmarks.

Lowering strategy: TVM's ONNX importer rejects blocked, int4 and FP8 Q/DQ, so the graph is
pre-processed at the ONNX level. Each quantized MatMul pattern (int4 DQ→Cast, MatMulNBits, FP8
Q/DQ pairs + FP8 weight DQ, bf16/fp16 Cast round trips + 16-bit weights) is replaced by a
placeholder node whose stored codes and scales are repacked (numpy) into the kernel layout;
leftover activation Q/DQ pairs and Cast round trips become exact elementwise kernels; every
other weight decode with constant inputs (Conv weights, int8) is folded at build time with the
exact DequantizeLinear semantics. The remaining graph is imported by a subclass of TVM's
``ONNXGraphImporter`` that turns the placeholders into ``relax.call_tir`` calls with the
packed weights as Relax constants. Kernels are marked scheduled and opaque, so Relax's
default pipeline (legalize, fuse, dlight on CUDA) leaves them as written.
"""
