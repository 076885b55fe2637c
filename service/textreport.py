"""Readable terminal summary of evaluations (``--format text``), with rich."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

TIER_STYLE = {"high": "bold red", "moderate": "yellow", "low": "green", "none": "dim", "established": "bold magenta", "insufficient-data": "cyan"}


def print_report(evaluations: Sequence[Any], console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    if not evaluations:
        console.print("No patients found.")
        return
    for ev in evaluations:
        a = ev.assessment
        cal, met = a.calciphylaxis, a.metastatic_calcification
        who = ", ".join(x for x in (a.sex or "sex unknown", f"age {a.age}" if a.age is not None else "age unknown") if x)
        console.rule(f"[bold]{a.patient}[/] ({who})")
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_row("Renal context", a.renal_context)
        suffix = " (incomplete data)" if cal.incomplete_data else ""
        table.add_row(
            "Calciphylaxis",
            f"[{TIER_STYLE.get(cal.tier, '')}]{cal.tier}{suffix}[/]  majors: {', '.join(cal.major_factors) or '—'}  "
            f"minors: {', '.join(cal.minor_factors) or '—'}",
        )
        product = f"  Ca×P {met.ca_x_p.value} mg²/dL²{' (paired with lag)' if met.ca_x_p.paired_with_lag else ''}" if met.ca_x_p else "  Ca×P —"
        table.add_row("Metastatic calcification", f"[{TIER_STYLE.get(met.tier, '')}]{met.tier}[/]{product}")
        if a.calcium:
            c = a.calcium
            table.add_row(
                "Calcium",
                f"measured {c.get('measured_mg_dl') or '—'} mg/dL, corrected {c.get('corrected_mg_dl') or '—'} mg/dL, "
                f"ionized {c.get('ionized_mmol_l') or '—'} mmol/L",
            )
        for card in a.cards:
            table.add_row(f"Card ({card['indicator']})", card["summary"])
        if a.suggested_orders:
            table.add_row("Suggested orders", ", ".join(a.suggested_orders))
        for note in a.notes:
            table.add_row("Note", note)
        if a.excluded:
            table.add_row(
                "Excluded",
                f"{len(a.excluded)} resource(s): " + "; ".join(f"{e.reference} ({e.reason})" for e in a.excluded[:3]) + (" …" if len(a.excluded) > 3 else ""),
            )
        console.print(table)
