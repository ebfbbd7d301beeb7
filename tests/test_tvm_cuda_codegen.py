"""The CUDA path without a GPU: TVM generates CUDA C for lpcompile's kernels, nvcc compiles it for
sm_90 (and sm_89), and the PTX / SASS is checked for the intended instructions:

* FP8 GEMM: ``mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32`` (and ``.e5m2``). In SASS, sm_89
  runs it natively (``QMMA.16832.F32.E4M3.E4M3``); sm_90 has no FP8 ``mma.sync`` unit and ptxas
  converts the operands (``F2FP.F16.E4M3.UNPACK_B``) for ``HMMA`` — Hopper's native FP8 path is
  ``wgmma``, see the module docstring of ``runtime/tvm/kernels/mma.py``;
* bf16 / fp16 GEMM: ``mma.sync.aligned.m16n8k16 ... bf16.bf16`` → ``HMMA.16816.F32.BF16``;
* int4 GEMV / GEMM: packed 32-bit words loaded from global memory, nibbles extracted with shifts
  and masks (``shr.u32`` / ``and.b32`` → ``SHF`` / ``LOP3``) and turned into floats with the
  ``0x4B000000`` exponent trick; the only global stores are the outputs (no dequantized weight
  in global memory).

The TVM build runs in a child process (``python -m lpcompile.runtime.tvm.kernel_suite``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")

from lpcompile.runtime.tvm import cuda_tools
from lpcompile.runtime.tvm.kernels import int4_matmul

pytestmark = pytest.mark.tvm

if cuda_tools.find_nvcc() is None:
    pytest.skip("nvcc not found", allow_module_level=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """``{"ptx": {kernel: text}, "sass90": {...}, "sass89": {...}}`` for the small kernel suite."""
    tmp = tmp_path_factory.mktemp("cuda")
    cu = tmp / "suite.cu"
    proc = subprocess.run(
        [sys.executable, "-m", "lpcompile.runtime.tvm.kernel_suite", str(cu), "--arch", "sm_90"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    src = cu.read_text()
    out90 = cuda_tools.compile_cuda(src, tmp / "sm90", "suite", arch="sm_90")
    result = {"ptx": cuda_tools.split_functions(out90["ptx"].read_text(), "ptx")}
    if cuda_tools.find_nvdisasm():
        out89 = cuda_tools.compile_cuda(src, tmp / "sm89", "suite", arch="sm_89", kinds=("cubin",))
        result["sass90"] = cuda_tools.split_functions(cuda_tools.disassemble(out90["cubin"]), "sass")
        result["sass89"] = cuda_tools.split_functions(cuda_tools.disassemble(out89["cubin"]), "sass")
    return result


def _kernel(funcs: dict[str, str], prefix: str) -> str:
    names = [n for n in funcs if n.startswith(prefix)]
    assert len(names) == 1, f"{prefix}: {sorted(funcs)}"
    return funcs[names[0]]


def _sass(compiled: dict, arch: str, prefix: str) -> str:
    if f"sass{arch}" not in compiled:
        pytest.skip("nvdisasm not found (pip install nvidia-cuda-nvdisasm)")
    return _kernel(compiled[f"sass{arch}"], prefix)


@pytest.mark.parametrize("short", ["e4m3", "e5m2"])
def test_fp8_gemm_uses_fp8_tensor_core_mma(compiled: dict, short: str) -> None:
    ptx = _kernel(compiled["ptx"], f"fp8_{short}_gemm")
    ops = cuda_tools.opcodes(ptx, "ptx")
    assert ops[f"mma.sync.aligned.m16n8k32.row.col.f32.{short}.{short}.f32"] >= 8
    assert not any(op.startswith(("cvt.f32.e", "cvt.rn.f16x2.e")) for op in ops)  # operands stay fp8
    sass89 = cuda_tools.opcodes(_sass(compiled, "89", f"fp8_{short}_gemm"), "sass")
    assert sass89[f"QMMA.16832.F32.{short.upper()}.{short.upper()}"] >= 8
    sass90 = cuda_tools.opcodes(_sass(compiled, "90", f"fp8_{short}_gemm"), "sass")
    assert sass90["HMMA.16816.F32"] >= 8  # sm_90 lowers fp8 mma.sync through fp16 HMMA


@pytest.mark.parametrize(
    "short, ptx_type, sass_op", [("bf16", "bf16", "HMMA.16816.F32.BF16"), ("fp16", "f16", "HMMA.16816.F32")]
)
def test_half_gemm_uses_tensor_cores(compiled: dict, short: str, ptx_type: str, sass_op: str) -> None:
    ptx = _kernel(compiled["ptx"], f"{short}_gemm")
    assert cuda_tools.opcodes(ptx, "ptx")[f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx_type}.{ptx_type}.f32"] >= 8
    assert cuda_tools.opcodes(_sass(compiled, "90", f"{short}_gemm"), "sass")[sass_op] >= 8


def _unpacks_nibbles(ptx: str) -> None:
    ops = cuda_tools.opcodes(ptx, "ptx")
    assert ops["shr.u32"] >= 7 and ops["and.b32"] >= 8  # 8 nibbles per packed word
    assert "1258291200" in ptx  # or.b32 with 0x4B000000: nibble → float without a conversion
    assert any(op.startswith("ld.global") and op.endswith("u32") for op in ops)  # packed words


@pytest.mark.parametrize("act", ["float16", "float32"])
def test_int4_gemv_unpacks_in_registers(compiled: dict, act: str) -> None:
    ptx = _kernel(compiled["ptx"], f"int4_gemv_{act}")
    _unpacks_nibbles(ptx)
    ops = cuda_tools.opcodes(ptx, "ptx")
    stores = {op: n for op, n in ops.items() if op.startswith("st.global")}
    # only the outputs: one per column of the warp (batch 1), no dequantized weights
    assert stores == {"st.global.f32": stores.get("st.global.f32", 0)}
    assert 0 < stores["st.global.f32"] <= int4_matmul.GEMV_COLS
    assert not [op for op in ops if op.startswith("st.shared") and "u32" in op]  # weights never staged
    sass = cuda_tools.opcodes(_sass(compiled, "90", f"int4_gemv_{act}"), "sass")
    assert sass["LOP3.LUT"] >= 8 and sass["SHF.R.U32.HI"] >= 7 and sass["SHFL.DOWN"] >= 5
    assert not [op for op in sass if op.startswith("I2F")]  # no int→float conversions per weight


def test_int4_gemm_unpacks_into_shared_tile_only(compiled: dict) -> None:
    ptx = _kernel(compiled["ptx"], "int4_gemm")
    _unpacks_nibbles(ptx)
    ops = cuda_tools.opcodes(ptx, "ptx")
    assert ops["st.shared.f32"] >= 8  # the dequantized tile lives in shared memory
    assert set(op for op in ops if op.startswith("st.global")) == {"st.global.f32"}
    assert ops["st.global.f32"] <= 16  # the 4 × 4 outputs of each thread


@pytest.mark.parametrize("prefix", ["fp8_e4m3_quantize", "bf16_round", "fp16_round"])
def test_activation_kernels_pack_words(compiled: dict, prefix: str) -> None:
    ops = cuda_tools.opcodes(_kernel(compiled["ptx"], prefix), "ptx")
    assert ops["st.global.u32"] == 1  # one packed word per thread


@pytest.mark.slow
def test_lower_model_for_cuda_writes_library_and_source(tmp_path: Path) -> None:
    from lpcompile.files import apply_file
    from lpcompile.runtime.tvm.build import lower_model

    examples = Path(__file__).resolve().parents[1] / "examples" / "models"
    model = tmp_path / "mlp.lp.onnx"
    apply_file(examples / "digits_mlp.onnx", model, uniform="fp8_e4m3", calib_path=examples / "digits_calib.npz")
    res = lower_model(model, tmp_path / "mlp.cuda.so", target="cuda", arch="sm_90", emit_source=tmp_path / "src")
    assert res.output.is_file() and res.meta.is_file()
    ptx = next(p for p in res.sources if p.suffix == ".ptx").read_text()
    assert "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32" in ptx
