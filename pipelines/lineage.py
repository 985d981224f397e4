"""``cssl lineage export``: the periods that ran, written out for DVC.

A period need not be declared in ``params.yaml`` to be refreshed (``cssl refresh --source
s3://raw/2026-12/``, ``--period auto``, the ``watch`` flow): it continues the stream the
registry has refreshed (:func:`pipelines.registry.period_chain`). The registry records the
chain that actually ran (each version's ``period``, ``previous_period`` and ``source`` tags),
so reproduction stays exact: :func:`ran_periods` reads it back, :func:`periods_to_export` keeps
the periods ``params.yaml`` does not declare yet, and :func:`append_periods` adds them to the
file's ``periods:`` block (comments and everything else in the file untouched, the result
validated before it replaces the file), after which ``dvc repro train@<period>`` rebuilds any
of them from the same shard, parent and replay memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from cssl_core.config import ConfigError, Params, params_from_dict
from cssl_core.data.storage import atomic_write_text
from pipelines.registry import ModelRegistry, VersionInfo


@dataclass(frozen=True)
class RanPeriod:
    """One period as it ran: its name, the period it continued from, where its frames came
    from, and the version the lineage keeps for it."""

    name: str
    previous: str
    source: str
    version: int
    gate: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def yaml_entry(self) -> str:
        """The period as one line of a ``periods:`` block (flow style, strings quoted)."""
        fields = f"previous: {json.dumps(self.previous)}"
        if self.source:
            fields += f", source: {json.dumps(self.source)}"
        return f"{self.name}: {{{fields}}}"


def ran_periods(registry: ModelRegistry) -> list[RanPeriod]:
    """Every refreshed period, in stream order, with the tags of the version the lineage keeps
    for it (the newest that passed the gate; the newest one when none did)."""
    versions: dict[str, VersionInfo] = {}
    kept = registry.lineage()
    for v in registry.versions():  # oldest first: the newest version of a period wins
        versions[v.period] = v
    out = []
    for period in registry.stream_periods():
        v = kept.get(period, versions[period])
        out.append(
            RanPeriod(
                period, v.lineage.previous_period, v.lineage.source, v.version, v.lineage.gate
            )
        )
    return out


def periods_to_export(params: Params, ran: list[RanPeriod]) -> list[RanPeriod]:
    """The periods that ran and ``params.yaml`` does not declare, in stream order.

    They must continue the declared chain: the first one's previous period is the last one
    declared, and each next one continues the one before. A declared period that ran after
    another previous period than the declared one, or a declared period that never ran
    before an undeclared one, makes the chains disagree: a one-line error says which.
    """
    declared = params.period_names
    new = []
    for period in ran:
        if params.is_declared(period.name):
            wanted = params.periods[period.name].previous
            if period.previous and period.previous != wanted:
                raise ConfigError(
                    f"period {period.name!r} ran after {period.previous!r}, but params.yaml "
                    f"declares its previous as {wanted!r}"
                )
            continue
        new.append(period)
    last = declared[-1] if declared else ""
    for period in new:
        if period.previous != last:
            raise ConfigError(
                f"period {period.name!r} ran after {period.previous or 'nothing'!r}, but it would "
                f"be appended after {last!r}: params.yaml's periods are not the chain that ran; "
                "edit periods: by hand (cssl lineage export prints what ran)"
            )
        last = period.name
    return new


_PERIODS_KEY = re.compile(r"^periods:\s*(#.*)?$")
_ENTRY = re.compile(r"^(\s+)\S")


def append_periods(path: Path, periods: list[RanPeriod]) -> str:
    """Add ``periods`` at the end of the ``periods:`` block of the params file ``path``
    (block style, one entry per line, as the project's params.yaml has it) and return the new
    text. The result must load, and declare exactly the old periods followed by the new ones,
    before it atomically replaces the file."""
    text = path.read_text(encoding="utf-8")
    if not periods:
        return text
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _PERIODS_KEY.match(line)), None)
    if start is None:
        raise ConfigError(
            f"{path} has no block-style `periods:` section to append to: add the periods "
            "`cssl lineage export` prints by hand"
        )
    # The block runs until the next line that is not indented; its entries sit at the indent
    # of its first line (an entry may continue on deeper lines: `p01:` then `previous: ""`).
    end, indent = start + 1, None
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ENTRY.match(line)
        if match is None:
            break
        indent = indent or match.group(1)
        end = i + 1
    if end > 0 and not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    new_lines = [f"{indent or '  '}{p.yaml_entry()}\n" for p in periods]
    updated = "".join(lines[:end] + new_lines + lines[end:])
    before = _declared(text, path)
    after = _declared(updated, path)
    if after != before + [p.name for p in periods]:
        raise ConfigError(f"{path}: could not append the periods to its periods: block")
    atomic_write_text(path, updated)
    return updated


def _declared(text: str, path: Path) -> list[str]:
    tree = yaml.safe_load(text) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return params_from_dict(tree, str(path)).period_names
