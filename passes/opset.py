"""Raising a model's default-domain opset (QDQ with int4, fp8 and blocks needs opset 21)."""

from __future__ import annotations

import logging
from typing import TypeVar, overload

import onnx
import onnx.helper
import onnx_ir as ir

from lpcompile.errors import LpError

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", onnx.ModelProto, ir.Model)


def min_ir_version(opset: int) -> int:
    """The IR version that goes with a default-domain opset (from onnx's version table)."""
    for _release, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return int(ir_version)
    return int(onnx.IR_VERSION)


def default_opset(model: ir.Model | onnx.ModelProto) -> int | None:
    """The model's default-domain (``""`` / ``ai.onnx``) opset version, or None."""
    if isinstance(model, onnx.ModelProto):
        versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        return max(versions) if versions else None
    imports = model.opset_imports
    versions = [imports[d] for d in ("", "ai.onnx") if d in imports]
    return max(versions) if versions else None


@overload
def ensure_opset(model: ir.Model, version: int = 21) -> ir.Model: ...
@overload
def ensure_opset(model: onnx.ModelProto, version: int = 21) -> onnx.ModelProto: ...


def ensure_opset(model: ir.Model | onnx.ModelProto, version: int = 21) -> ir.Model | onnx.ModelProto:
    """Make sure the default-domain opset is at least ``version`` (and the IR version fits).

    An ``ir.Model`` is converted in place (onnxscript's version converter, which falls back to
    ``onnx.version_converter`` for old opsets) and returned; an ``onnx.ModelProto`` is converted
    with ``onnx.version_converter`` and the converted proto is returned. A model without a
    default-domain import simply gets one. Models already at ``version`` or newer are untouched.

    Raises:
        LpError: when the converter fails or cannot reach ``version``.
    """
    current = default_opset(model)
    if current is not None and current >= version:
        return model
    if isinstance(model, onnx.ModelProto):
        return _ensure_proto(model, current, version)
    if current is None:
        model.opset_imports[""] = version
    else:
        _convert_ir(model, current, version)
    model.ir_version = max(int(model.ir_version or 0), min_ir_version(version))
    logger.info("raised the default-domain opset from %s to %d", current, version)
    return model


def _ensure_proto(model: onnx.ModelProto, current: int | None, version: int) -> onnx.ModelProto:
    if current is None:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.opset_import.append(onnx.helper.make_opsetid("", version))
    else:
        try:
            out = onnx.version_converter.convert_version(model, version)
        except Exception as exc:
            raise LpError(
                f"cannot convert the model from opset {current} to opset {version} "
                f"(needed for int4/fp8/blocked QDQ): {_describe(exc)}"
            ) from None
    out.ir_version = max(out.ir_version, min_ir_version(version))
    if (default_opset(out) or 0) < version:
        raise LpError(f"cannot convert the model from opset {current} to opset {version}")
    return out


def _convert_ir(model: ir.Model, current: int, version: int) -> None:
    from onnxscript.version_converter import ConvertVersionPass

    # onnxscript logs its fallback (and failures, with a traceback) as warnings; we report the
    # outcome ourselves in one line, so keep its logger quiet during the conversion.
    converter_logger = logging.getLogger("onnxscript.version_converter")
    saved = converter_logger.level
    converter_logger.setLevel(logging.ERROR)
    try:
        ConvertVersionPass(target_version=version, fallback=True)(model)
    except Exception as exc:
        raise LpError(
            f"cannot convert the model from opset {current} to opset {version} "
            f"(needed for int4/fp8/blocked QDQ): {_describe(exc)}"
        ) from None
    finally:
        converter_logger.setLevel(saved)
    reached = default_opset(model) or 0
    if reached < version:
        raise LpError(
            f"cannot convert the model from opset {current} to opset {version} (converter stopped at {reached})"
        )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
