"""Argument groups shared by several commands."""

from __future__ import annotations

import argparse

from lpcompile.analysis.config import DEFAULT_FORMATS, AnalysisConfig
from lpcompile.errors import UsageError
from lpcompile.formats import parse_format_list
from lpcompile.io_utils import check_seed


def add_analysis_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("analysis")
    g.add_argument("--calib", help="calibration .npz (arrays keyed by input name) or a folder of them")
    g.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help="candidate formats, comma-separated (default: %(default)s; fp32 always allowed)",
    )
    g.add_argument("--probes", type=int, default=16, help="Hutchinson probes (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-samples", type=int, help="use at most this many calibration samples")
    g.add_argument(
        "--method",
        choices=["diag", "trace"],
        default="diag",
        help="diag: ½ΣH_iiδ² (default); trace: HAWQ-v2 ½·Tr(H)/n·‖δ‖²",
    )
    g.add_argument("--loss", choices=["auto", "kl", "mse"], default="auto")
    g.add_argument(
        "--rounding",
        "--weight-rounding",
        dest="weight_rounding",
        choices=["nearest", "rtn", "mse", "gptq"],
        default="nearest",
        help="how candidates are rounded when scored (and, for compile, written): gptq/mse use the layers' "
        "input XᵀX from the calibration data; a format's own ':rounding' suffix wins (default: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="SPEC",
        help="input shape for synthetic data: NAME=1x3x640x640, NAME=batch:1,width:320 or width:320 (repeatable)",
    )
    g.add_argument(
        "--outputs",
        metavar="NAME[,NAME]",
        help="outputs the loss is measured on (default: floating outputs that depend on weights)",
    )
    add_scale_args(g)


def add_scale_args(g: argparse._ArgumentGroup) -> None:
    """Convergence, devices and sharding of the analysis (see :mod:`lpcompile.analysis.shard`)."""
    g.add_argument(
        "--probe-tol",
        type=float,
        metavar="REL",
        help="draw probes in rounds until every node's Hessian-trace estimate has this relative standard "
        "error (e.g. 0.05); default: exactly --probes probes",
    )
    g.add_argument("--max-probes", type=int, default=256, help="at most this many probes with --probe-tol")
    g.add_argument(
        "--seeding",
        choices=["auto", "sequential", "per-probe"],
        default="auto",
        help="probe seeding; per-probe draws each probe from (seed, batch, probe), as sharded runs do "
        "(auto: per-probe with --workers/--ray, else sequential)",
    )
    g.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where the analysis runs")
    g.add_argument("--workers", type=int, default=1, help="worker processes for the probe passes (default: 1)")
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the probe passes as Ray tasks: a local Ray without ADDRESS, else ray.init(address=ADDRESS)",
    )
    g.add_argument("--shard-dir", help="a folder all workers can read (shared file system for a Ray cluster)")
    g.add_argument(
        "--stream",
        choices=["auto", "on", "off"],
        default="auto",
        help="analyse segment by segment, one segment's weights in memory (auto: when the weights exceed 256 MiB)",
    )
    g.add_argument("--segment-mb", type=float, metavar="MB", help="weight megabytes per streamed segment")
    g.add_argument(
        "--probe-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="arithmetic of the streamed probe passes: bfloat16 runs their matrix products in bf16 (fp32 "
        "accumulation; faster on CPUs with bf16 units), estimates within a fraction of the probe noise",
    )


def analysis_config(args: argparse.Namespace) -> AnalysisConfig:
    limits = (("--probes", args.probes), ("--batch-size", args.batch_size), ("--max-samples", args.max_samples))
    for flag, value in limits:
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    check_seed(args.seed)
    from lpcompile.analysis.losses import parse_outputs
    from lpcompile.frontend.input_spec import parse_input_shapes

    input_shapes = tuple(getattr(args, "input_shape", None) or ())
    parse_input_shapes(input_shapes)  # a malformed spec is a usage error before any work
    return AnalysisConfig(
        formats=parse_format_list(args.formats),
        probes=args.probes,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        seed=args.seed,
        method=args.method,
        loss=args.loss,
        outputs=parse_outputs(getattr(args, "outputs", None)),
        input_shapes=input_shapes,
        probe_tol=getattr(args, "probe_tol", None),
        max_probes=getattr(args, "max_probes", 256),
        seeding=getattr(args, "seeding", "auto"),
        device=getattr(args, "device", "cpu"),
        workers=getattr(args, "workers", 1),
        ray=getattr(args, "ray", None),
        shard_dir=getattr(args, "shard_dir", None),
        rounding=getattr(args, "weight_rounding", "nearest"),
        stream=getattr(args, "stream", "auto"),
        segment_mb=getattr(args, "segment_mb", None),
        probe_dtype=getattr(args, "probe_dtype", "float32"),
    )


def add_keep_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="RULE",
        help="pin or restrict nodes: 'REGEX=FMT', 'REGEX=!FMT', or 'REGEX' (= fp32); repeatable",
    )


def keep_rules(args: argparse.Namespace) -> list:
    from lpcompile.solver import parse_keep

    return [parse_keep(s) for s in args.keep]


def add_target_args(p: argparse.ArgumentParser, softmax_default: str | None = "auto") -> None:
    """``--target`` and ``--softmax`` (choices from :mod:`lpcompile.config`)."""
    from lpcompile.config import SoftmaxMode, Target

    p.add_argument(
        "--target",
        choices=[t.value for t in Target],
        default=Target.QDQ.value,
        help="qdq: portable standard ONNX; ort: ONNX Runtime kernels (int4 MatMul as MatMulNBits); tvm: TVM lowering",
    )
    p.add_argument(
        "--softmax",
        choices=[m.value for m in SoftmaxMode],
        default=softmax_default,
        help="two-pass softmax substitution (auto: only where the target runs it faster)",
    )


def add_int8_residuals_arg(p: argparse.ArgumentParser) -> None:
    """``--int8-residuals`` (:mod:`lpcompile.passes.qlinear_add`)."""
    p.add_argument(
        "--int8-residuals",
        action="store_true",
        help="with --target ort: also round the residual Adds between w8a8 Convs (QLinearAdd), so the int8 "
        "Conv chains run through each block; adds error the analyzer does not score (the guard measures it). "
        "With --objective latency (and w8a8 among --formats) the solver keeps the chains whole",
    )


def add_objective_arg(p: argparse.ArgumentParser) -> None:
    """``--objective`` (:mod:`lpcompile.solver.latency`)."""
    p.add_argument(
        "--objective",
        choices=["auto", "size", "fast", "latency", "both"],
        default="auto",
        help="auto (default): fast on qdq/ort, size on tvm; "
        "size: least predicted loss in the budget; fast: the same among formats that run at least as fast "
        "as fp32 on --target (no emulated bf16/FP8 activation rounding on ONNX Runtime); both: among "
        "near-equal-loss choices the faster one; latency: speed first (none refuses a budget)",
    )


def budget_arg(text: str) -> str:
    """``--budget`` checked before any work: a malformed budget is a usage error (exit 2); an
    infeasible one is found later and is a failure (exit 1)."""
    from lpcompile.budget import parse_budget
    from lpcompile.errors import BudgetError

    try:
        parse_budget(text)
    except BudgetError as exc:
        raise UsageError(f"--budget: {exc}") from None
    return text
