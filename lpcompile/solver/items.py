"""Solver items from a sensitivity table: the one builder behind ``--budget``, ``--sweep`` and the report."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace

from lpcompile.analysis.table import SensitivityTable
from lpcompile.errors import FormatError
from lpcompile.formats import canonical_name
from lpcompile.solver.problem import Choice, Item, KeepRule

logger = logging.getLogger(__name__)


def items_from_table(table: SensitivityTable, formats: Sequence[str] | None = None) -> list[Item]:
    """One item per table node with the candidates in ``formats`` (fp32 always allowed).

    Nodes that share a weight initializer (a tied group) store it once: the first node of the
    group carries the weight's parameters and predicted loss (its Hessian diagonal already sums
    every use of the weight), the others count zero, so the budget and the objective see the
    shared weight once.

    Raises:
        FormatError: a node has none of the requested formats.
    """
    allowed = None if formats is None else {canonical_name(f) for f in formats} | {"fp32"}
    items = []
    stored: set[str] = set()
    for n in table.nodes:
        repeat = bool(n.group) and n.weight in stored
        stored.add(n.weight)
        choices = tuple(
            Choice(format=f, bits=c.bits, loss=0.0 if repeat else float(c.predicted_loss or 0.0))
            for f, c in n.candidates.items()
            if allowed is None or f in allowed
        )
        if not choices:
            raise FormatError(f"node {n.name!r} has none of the requested formats in the sensitivity table")
        items.append(Item(name=n.name, params=0 if repeat else n.params, choices=choices, group=n.group))
    return items


def rules_for_table(table: SensitivityTable, keep: Sequence[KeepRule]) -> tuple[KeepRule, ...]:
    """``--keep`` rules that also match PyTorch module paths.

    Solver items carry node names only, so a rule whose regex matches the module path of some node
    (``encoder.layer.0.attention.self.query``) becomes an exact-name rule for every node whose name
    *or* module path it matches (its ``spec``, used in messages, is unchanged). Other rules are kept.
    """
    out = []
    for rule in keep:
        if not any(n.module_path and rule.matches(n.module_path) for n in table.nodes):
            out.append(rule)
            continue
        names = [n.name for n in table.nodes if rule.matches(n.name) or (n.module_path and rule.matches(n.module_path))]
        pattern = "^(?:" + "|".join(re.escape(name) for name in names) + ")$"
        out.append(replace(rule, pattern=pattern, spec=rule.spec))
    return tuple(out)


def solver_items(
    table: SensitivityTable, formats: Sequence[str] | None = None, keep: Sequence[KeepRule] = ()
) -> tuple[Item, ...]:
    """Items of ``table`` restricted to ``formats`` with the ``keep`` rules applied (module paths too)."""
    from lpcompile.solver.problem import apply_rules

    return apply_rules(items_from_table(table, formats), rules_for_table(table, keep))
