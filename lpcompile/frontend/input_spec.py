"""Input shapes: the model's input signature, ``--input-shape`` overrides, and the sizes synthetic data uses.

A graph input declares a shape whose dims are fixed (``64``), named symbols (``'batch'``,
``'width'``) or anonymous (``?``). To build synthetic inputs or to batch real data, lpcompile needs
one concrete size per dim and knows which axis holds the *samples*:

* **Sample axis.** The axis of the batch symbol: the dim_param found at axis 0 of most inputs, or
  one named like ``batch``/``batch_size``/``N``. An input whose batch symbol sits elsewhere (a
  recurrent state ``[2, batch, 128]``) has its samples on that axis. With a *fixed* batch (``[1, 1,
  64, 'width']``) the sample axis is axis 0, or, for an input whose axis 0 differs from the fixed
  batch (``[2, 1, 128]``), its first axis of that size. Rank-0 inputs (a sample rate) have no
  sample axis: one value serves every sample. A fixed batch dim is honoured everywhere: batches
  hold exactly that many samples.
* **Other symbolic dims**, first rule that applies: ``--input-shape`` (by symbol name, by axis, or
  the full shape); the same symbol already sized on another input; a candidate list by kind —
  image-like dims (names ``height``/``width``/``h``/``w``, or axes 2, 3 of a rank-4 float input)
  try 16, 32, 64, 128, 224, 320, 640 in turn; others (sequence lengths) try 16, 32, 64, 128 — the
  first size at which the model runs on one synthetic sample (checked in ONNX Runtime) wins.
* **When nothing runs**, one line names the input, the shape used, the op that failed, and the
  flag to fix it: ``--input-shape NAME=...`` or ``--calib DATA``.

``--input-shape`` syntax (repeatable; the CLI splits on whitespace):

* ``images=1x3x640x640`` — the full shape of input ``images`` (``x`` or ``,`` between dims);
* ``input1=batch:1,image_width:320`` — sizes by symbol name for that input (an integer key is an
  axis: ``input1=3:320``); a symbol set on one input applies wherever it appears;
* ``batch:1,width:320`` — symbol sizes for every input.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from lpcompile.errors import CalibrationError, LpError, ModelLoadError, UsageError

logger = logging.getLogger(__name__)

IMAGE_SIZES: tuple[int, ...] = (16, 32, 64, 128, 224, 320, 640)
"""Candidate sizes of an image-like symbolic dim, tried in order."""
SEQUENCE_SIZES: tuple[int, ...] = (16, 32, 64, 128)
"""Candidate sizes of any other symbolic dim (a sequence length), tried in order."""

_BATCH_NAME = re.compile(r"^(n|b|bs|batch|batch_?size|batches|num_?samples|unk__\d+_batch)$|batch", re.IGNORECASE)
_IMAGE_NAME = re.compile(r"^(h|w|height|width|img_?h|img_?w|image_?height|image_?width)$|height|width", re.IGNORECASE)

Dim = int | str | None
Probe = Callable[[Mapping[str, np.ndarray]], None]
"""Runs the model once on the given inputs; raises (any exception) when it cannot."""


# --------------------------------------------------------------------------------------------
# the model's input signature


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, element type and shape (``None`` = unknown shape; str/None dims symbolic)."""

    name: str
    dtype: ir.DataType
    shape: tuple[Dim, ...] | None


def as_ir_model(model: ir.Model | onnx.ModelProto) -> ir.Model:
    return ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model


def _dims(value: ir.Value) -> tuple[Dim, ...] | None:
    if value.shape is None:
        return None
    out: list[Dim] = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(int(d))
        else:
            out.append(getattr(d, "value", None))
    return tuple(out)


def model_input_specs(model: ir.Model | onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers, in graph order."""
    m = as_ir_model(model)
    specs = []
    for v in m.graph.inputs:
        if v.is_initializer():
            continue
        dtype = v.dtype if v.dtype is not None else ir.DataType.UNDEFINED
        specs.append(InputSpec(v.name or "", dtype, _dims(v)))
    return specs


def specs_of(model: ir.Model | onnx.ModelProto | Sequence[InputSpec] | str | os.PathLike[str]) -> list[InputSpec]:
    """Input specs of a model (in memory, or a file read without its weights), or the given specs as a list."""
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf/decode errors of a damaged file
            raise ModelLoadError(f"cannot read {path}: {_one_line(exc)}") from None
        return model_input_specs(proto)
    if isinstance(model, ir.Model | onnx.ModelProto):
        return model_input_specs(model)
    return list(model)


def batch_symbol(specs: Sequence[InputSpec]) -> str | None:
    """The dim_param naming the batch: the most common one at axis 0, else one named like a batch."""
    at0 = Counter(s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str))
    if at0:
        best, count = at0.most_common(1)[0]
        named = [k for k in at0 if _BATCH_NAME.search(k)]
        if count > 1 or not named or best in named:
            return best
        return named[0]
    for s in specs:
        for d in s.shape or ():
            if isinstance(d, str) and _BATCH_NAME.search(d):
                return d
    return None


def fixed_batch_size(model: ir.Model | onnx.ModelProto | Sequence[InputSpec]) -> int | None:
    """The fixed batch the inputs declare (axis 0 of inputs without a batch symbol), else None.

    Inputs whose batch symbol sits on another axis, and rank-0 inputs, do not count.
    """
    specs = specs_of(model)
    sym = batch_symbol(specs)
    fixed = set()
    for s in specs:
        if not s.shape or (sym is not None and sym in s.shape):
            continue
        if isinstance(s.shape[0], int):
            fixed.add(int(s.shape[0]))
    if not fixed:
        return None
    if len(fixed) > 1:  # e.g. a state [2, 1, 128] beside [1, 512]: the batch is the size most inputs agree on
        counts = Counter(int(s.shape[0]) for s in specs if s.shape and isinstance(s.shape[0], int))
        small = min(fixed)
        if small == 1 or counts[small] >= max(counts.values()):
            return small
        return math.lcm(*fixed)
    return fixed.pop()


def sample_axis(spec: InputSpec, specs: Sequence[InputSpec]) -> int | None:
    """The axis holding the samples of ``spec`` (see the module docstring); None for rank 0."""
    if spec.shape is None:
        return 0
    if len(spec.shape) == 0:
        return None
    sym = batch_symbol(specs)
    if sym is not None and sym in spec.shape:
        return spec.shape.index(sym)
    fixed = fixed_batch_size(specs)
    if fixed is not None and spec.shape[0] != fixed:
        for axis, d in enumerate(spec.shape):
            if d == fixed:
                return axis
    return 0


# --------------------------------------------------------------------------------------------
# --input-shape


@dataclass(frozen=True)
class ShapeOverride:
    """One ``--input-shape`` value.

    Attributes:
        name: the input it names, or None for symbol sizes that apply to every input.
        dims: the full shape, when given as ``1x3x640x640``.
        sizes: ``(symbol or axis index, size)`` pairs, when given as ``batch:1,width:320``.
    """

    name: str | None
    dims: tuple[int, ...] | None = None
    sizes: tuple[tuple[str | int, int], ...] = ()


def _positive(text: str, whole: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise UsageError(f"--input-shape {whole!r}: {text!r} is not an integer size") from None
    if v < 1:
        raise UsageError(f"--input-shape {whole!r}: sizes must be at least 1, not {v}")
    return v


def parse_input_shape(text: str) -> ShapeOverride:
    """Parse ``name=1x3x640x640``, ``name=batch:1,width:320`` or ``batch:1,width:320``.

    Raises:
        UsageError: malformed text.
    """
    whole = text.strip()
    if not whole:
        raise UsageError("--input-shape needs a value, e.g. images=1x3x640x640")
    name: str | None = None
    body = whole
    if "=" in whole:
        name, body = (p.strip() for p in whole.split("=", 1))
        if not name:
            raise UsageError(f"--input-shape {whole!r}: missing input name before '='")
    if ":" in body:
        sizes: list[tuple[str | int, int]] = []
        for part in body.split(","):
            if ":" not in part:
                raise UsageError(f"--input-shape {whole!r}: expected SYMBOL:SIZE, got {part!r}")
            key, value = (p.strip() for p in part.split(":", 1))
            if not key:
                raise UsageError(f"--input-shape {whole!r}: empty symbol name")
            sizes.append((int(key) if re.fullmatch(r"-?\d+", key) else key, _positive(value, whole)))
        return ShapeOverride(name=name, sizes=tuple(sizes))
    if name is None:
        raise UsageError(f"--input-shape {whole!r}: give NAME=1x3x224x224 or SYMBOL:SIZE[,SYMBOL:SIZE]")
    parts = [p for p in re.split(r"[x,×]", body) if p.strip()]
    if not parts:
        raise UsageError(f"--input-shape {whole!r}: no dims after '='")
    return ShapeOverride(name=name, dims=tuple(_positive(p.strip(), whole) for p in parts))


def parse_input_shapes(texts: Sequence[str] | None) -> tuple[ShapeOverride, ...]:
    """Parse every ``--input-shape`` value (each may hold several, separated by whitespace or ';')."""
    out: list[ShapeOverride] = []
    for text in texts or ():
        out.extend(parse_input_shape(t) for t in re.split(r"[\s;]+", text) if t.strip())
    return tuple(out)


# --------------------------------------------------------------------------------------------
# resolution


@dataclass(frozen=True)
class ResolvedInput:
    """One input with concrete dims.

    Attributes:
        name: the input name.
        dtype: its element type.
        declared: the declared shape (None: unknown).
        shape: concrete dims; the sample axis holds the batch unit (the fixed batch, or 1).
        sample_axis: the axis of the samples, None for rank 0.
        origin: per axis, where the size came from: ``declared``, ``flag``, ``shared``,
            ``default``, ``probed`` or ``sample``.
    """

    name: str
    dtype: ir.DataType
    declared: tuple[Dim, ...] | None
    shape: tuple[int, ...]
    sample_axis: int | None
    origin: tuple[str, ...] = ()

    def with_samples(self, n: int) -> tuple[int, ...]:
        """The shape with ``n`` samples on the sample axis."""
        if self.sample_axis is None:
            return self.shape
        dims = list(self.shape)
        dims[self.sample_axis] = n
        return tuple(dims)

    def text(self, n: int | None = None) -> str:
        """``1x3x640x640`` (with ``n`` samples on the sample axis when given)."""
        dims = self.shape if n is None else self.with_samples(n)
        return "x".join(str(d) for d in dims) if dims else "scalar"


@dataclass(frozen=True)
class InputShapes:
    """Concrete shapes of all inputs, and what was tried to find them."""

    inputs: tuple[ResolvedInput, ...]
    fixed_batch: int | None
    tried: tuple[str, ...] = field(default=())

    def by_name(self) -> dict[str, ResolvedInput]:
        return {r.name: r for r in self.inputs}

    def sample_axes(self) -> dict[str, int | None]:
        return {r.name: r.sample_axis for r in self.inputs}


def _is_image_dim(spec: InputSpec, axis: int, dim: Dim) -> bool:
    if isinstance(dim, str) and _IMAGE_NAME.search(dim):
        return True
    shape = spec.shape or ()
    return len(shape) == 4 and axis in (2, 3) and spec.dtype.is_floating_point()


def _free_dims(specs: Sequence[InputSpec], axes: Mapping[str, int | None]) -> list[tuple[str, int, Dim]]:
    out = []
    for s in specs:
        for axis, d in enumerate(s.shape or ()):
            if axis != axes[s.name] and not isinstance(d, int):
                out.append((s.name, axis, d))
    return out


def resolve_input_shapes(
    model: ir.Model | onnx.ModelProto | Sequence[InputSpec],
    overrides: Sequence[ShapeOverride] = (),
    *,
    probe: Probe | None = None,
    make_inputs: Callable[[InputShapes], Mapping[str, np.ndarray]] | None = None,
    first_size: int = 16,
) -> InputShapes:
    """Concrete dims for every input (see the module docstring for the rules).

    Args:
        model: the model or its input specs.
        overrides: parsed ``--input-shape`` values.
        probe: runs the model on one batch unit; when given, symbolic dims without an override
            try their candidate sizes until the probe passes.
        make_inputs: builds the probe's inputs from a trial resolution (default: zeros / ones).
        first_size: the first size tried for every free dim (the candidate lists continue above it).

    Raises:
        UsageError: an override names an unknown input, has the wrong rank or contradicts a
            fixed dim.
        CalibrationError: an input without a declared shape, or no candidate size runs (the
            message names the input, the shape tried, the error and the flag).
    """
    specs = specs_of(model)
    by_name = {s.name: s for s in specs}
    axes = {s.name: sample_axis(s, specs) for s in specs}
    fixed = fixed_batch_size(specs)
    bsym = batch_symbol(specs)
    unit = fixed or 1

    symbol_sizes: dict[str, int] = {}
    axis_sizes: dict[tuple[str, int], int] = {}
    for o in overrides:
        if o.name is not None and o.name not in by_name:
            raise UsageError(
                f"--input-shape names unknown input {o.name!r} (model inputs: {', '.join(by_name) or 'none'})"
            )
        targets = [by_name[o.name]] if o.name is not None else specs
        if o.dims is not None:
            s = by_name[o.name or ""]
            if s.shape is not None and len(s.shape) != len(o.dims):
                raise UsageError(
                    f"--input-shape {o.name}: {len(o.dims)} dims given, the model declares rank {len(s.shape)} "
                    f"{_fmt(s.shape)}"
                )
            for axis, size in enumerate(o.dims):
                axis_sizes[(s.name, axis)] = size
            continue
        for key, size in o.sizes:
            if isinstance(key, int):
                for s in targets:
                    rank = len(s.shape) if s.shape is not None else None
                    if rank is not None and not -rank <= key < rank:
                        raise UsageError(f"--input-shape {s.name}: axis {key} out of range for rank {rank}")
                    axis_sizes[(s.name, key % rank if rank else key)] = size
            else:
                if not any(key in (s.shape or ()) for s in targets):
                    where = f"input {o.name!r}" if o.name else "any input"
                    raise UsageError(f"--input-shape: symbol {key!r} does not appear in {where}")
                symbol_sizes[key] = size
    if bsym is not None and bsym in symbol_sizes:
        unit = symbol_sizes[bsym]
        fixed = unit if fixed is None else fixed

    for (name, axis), size in axis_sizes.items():
        s = by_name[name]
        d = s.shape[axis] if s.shape is not None and axis < len(s.shape) else None
        if isinstance(d, int) and d != size:
            raise UsageError(f"--input-shape {name}: axis {axis} is fixed to {d} in the model, not {size}")
        if axis == axes[name]:
            if fixed is not None and fixed != size:
                raise UsageError(f"--input-shape {name}: batch {size} contradicts the fixed batch {fixed}")
            unit = size
            fixed = size

    # first pass: everything that needs no probing
    free = _free_dims(specs, axes)
    choice: dict[tuple[str, int], int] = {}
    origin: dict[tuple[str, int], str] = {}
    pending: list[tuple[str, int, Dim]] = []
    for name, axis, d in free:
        if (name, axis) in axis_sizes:
            choice[(name, axis)], origin[(name, axis)] = axis_sizes[(name, axis)], "flag"
        elif isinstance(d, str) and d in symbol_sizes:
            choice[(name, axis)], origin[(name, axis)] = symbol_sizes[d], "flag"
        else:
            pending.append((name, axis, d))
    for name, axis, _ in free:  # a symbol sized by a full-shape flag sizes its other occurrences
        d = by_name[name].shape[axis]  # type: ignore[index]
        if isinstance(d, str) and origin.get((name, axis)) == "flag" and d not in symbol_sizes:
            symbol_sizes[d] = choice[(name, axis)]
    still: list[tuple[str, int, Dim]] = []
    for name, axis, d in pending:
        if isinstance(d, str) and d in symbol_sizes:
            choice[(name, axis)], origin[(name, axis)] = symbol_sizes[d], "shared"
        else:
            still.append((name, axis, d))

    # groups of still-free dims: one group per symbol name, one per anonymous dim
    groups: dict[object, list[tuple[str, int]]] = {}
    image: dict[object, bool] = {}
    for name, axis, d in still:
        key: object = d if isinstance(d, str) else (name, axis)
        groups.setdefault(key, []).append((name, axis))
        image[key] = image.get(key, False) or _is_image_dim(by_name[name], axis, d)

    def build(sizes: Mapping[object, int], how: str) -> InputShapes:
        resolved = []
        for s in specs:
            if s.shape is None:
                raise CalibrationError(
                    f"input {s.name!r} has no declared shape: give it with --input-shape {s.name}=DIMxDIM... "
                    "or real data with --calib"
                )
            dims, orig = [], []
            for axis, d in enumerate(s.shape):
                if axis == axes[s.name]:
                    dims.append(unit if not isinstance(d, int) else d)
                    orig.append("sample")
                elif isinstance(d, int):
                    dims.append(d)
                    orig.append("declared")
                elif (s.name, axis) in choice:
                    dims.append(choice[(s.name, axis)])
                    orig.append(origin[(s.name, axis)])
                else:
                    key = d if isinstance(d, str) else (s.name, axis)
                    dims.append(sizes[key])
                    orig.append(how)
            resolved.append(ResolvedInput(s.name, s.dtype, s.shape, tuple(dims), axes[s.name], tuple(orig)))
        return InputShapes(tuple(resolved), fixed)

    ladders = _ladders(groups, image, first_size)
    defaults = ladders[0]
    first = build(defaults, "default")
    if probe is None or not free:  # nothing was chosen: the declared shapes are what they are
        return first
    make = make_inputs or _plain_inputs
    tried: list[str] = []
    errors: list[str] = []
    for sizes in ladders:
        trial = build(sizes, "probed" if sizes != defaults else "default")
        tried.append(_describe(trial, groups))
        try:
            probe(make(trial))
        except Exception as exc:  # any failure of the model at these sizes: try the next
            errors.append(_one_line(exc))
            logger.info("model does not run at %s: %s", tried[-1], errors[-1])
            continue
        if sizes != defaults:
            logger.warning("synthetic inputs: the model runs at %s (smaller sizes fail)", tried[-1])
        return InputShapes(trial.inputs, fixed, tuple(tried))
    raise CalibrationError(synthetic_failure_message(first, errors[0] if errors else "fails", tried=tried))


def _ladders(
    groups: Mapping[object, list[tuple[str, int]]], image: Mapping[object, bool], first: int
) -> list[dict[object, int]]:
    """Trial sizes: all groups step through their candidate lists together (the last size repeats)."""
    if not groups:
        return [{}]
    cands = {k: (first, *(c for c in (IMAGE_SIZES if image[k] else SEQUENCE_SIZES) if c > first)) for k in groups}
    longest = max(len(c) for c in cands.values())
    out: list[dict[object, int]] = []
    for i in range(longest):
        sizes = {k: c[min(i, len(c) - 1)] for k, c in cands.items()}
        if sizes not in out:
            out.append(sizes)
    return out


def _describe(shapes: InputShapes, groups: Mapping[object, list[tuple[str, int]]]) -> str:
    names = {n for members in groups.values() for n, _ in members}
    return ", ".join(f"{r.name}={r.text()}" for r in shapes.inputs if r.name in names) or "declared shapes"


def _plain_inputs(shapes: InputShapes) -> dict[str, np.ndarray]:
    """Probe inputs: N(0, 1) floats (seeded), ones for masks, zeros for other integers."""
    rng = np.random.default_rng(0)
    out = {}
    for r in shapes.inputs:
        np_dtype = r.dtype.numpy() if r.dtype != ir.DataType.UNDEFINED else np.dtype(np.float32)
        if r.dtype.is_floating_point():
            out[r.name] = rng.standard_normal(r.shape).astype(np.float32).astype(np_dtype)
        elif "mask" in r.name.lower() or r.dtype == ir.DataType.BOOL:
            out[r.name] = np.ones(r.shape, dtype=np_dtype)
        else:
            out[r.name] = np.zeros(r.shape, dtype=np_dtype)
    return out


def _fmt(shape: Sequence[Dim] | None) -> str:
    if shape is None:
        return "(unknown)"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def synthetic_failure_message(shapes: InputShapes, error: str, *, tried: Sequence[str] = ()) -> str:
    """One line: which synthetic shapes failed, the error, and the flags that fix it."""
    free = [
        r
        for r in shapes.inputs
        if r.declared is not None
        and any(not isinstance(d, int) for i, d in enumerate(r.declared) if i != r.sample_axis)
    ]
    target = free[0] if free else (shapes.inputs[0] if shapes.inputs else None)
    used = "; ".join(f"{r.name} {r.text()}" for r in (free or shapes.inputs))
    also = f" (also tried {', '.join(tried[1:])})" if len(tried) > 1 else ""
    if target is not None:
        example = "x".join(
            str(d) if isinstance(d, int) else (d.upper() if isinstance(d, str) else "N")
            for d in (target.declared or target.shape)
        )
        fix = f"give the real shape with --input-shape {target.name}={example} or real data with --calib DATA"
    else:
        fix = "give real data with --calib DATA"
    return f"the model fails on synthetic inputs of shape {used}{also}: {error}; {fix}"


def explain_failure(exc: BaseException, shapes: InputShapes | None) -> LpError:
    """Turn an op failure on synthetic data into the one-line error of :func:`synthetic_failure_message`.

    For callers whose analysis failed after synthesis (e.g. the torch interpreter rejects an op at
    the chosen sizes). With ``shapes`` None the error is returned as a plain one-line LpError.
    """
    if shapes is None:
        return exc if isinstance(exc, LpError) else LpError(_one_line(exc))
    return CalibrationError(synthetic_failure_message(shapes, _one_line(exc), tried=shapes.tried))


def ort_probe(model: ir.Model | onnx.ModelProto) -> Probe:
    """A probe that runs ``model`` in ONNX Runtime (session built once, on first use)."""
    state: dict[str, object] = {}

    def run(inputs: Mapping[str, np.ndarray]) -> None:
        from lpcompile.runtime.ort import make_session
        from lpcompile.runtime.ort import run as ort_run

        if "session" not in state:
            state["session"] = make_session(model, numerics="exact")
        ort_run(state["session"], inputs)  # type: ignore[arg-type]

    return run
