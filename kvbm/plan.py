"""Plans: slot-level operations the planner decides and the executor runs.

A plan names storage by (tier index, slot) and engine memory by the engine's block
index; it carries no buffers, no tier objects and no locks, so it crosses a process
boundary as it is (vLLM's scheduler builds plans, its workers run them). Every
operation but a discard has an ``op_id``; the executor answers each with the set of
positions (indices into the operation's lists) that failed, and the planner applies
those answers to its registries (``Planner.apply``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SaveOp:
    """Copy engine block ``src[i]`` into slot ``slots[i]`` of tier ``tier`` as block ``keys[i]``.

    ``owners[i]`` (optional) names the request that computed block ``i``: an executor
    fails every block of a request whose load failed in the same step, since that KV
    was computed on top of bytes that never arrived.
    """

    op_id: int
    tier: int
    slots: list[int]
    keys: list[bytes]
    src: list[int]
    owners: list[str] = field(default_factory=list)


@dataclass(slots=True)
class LoadOp:
    """Copy block ``keys[i]`` from slot ``slots[i]`` of tier ``tiers[i]`` into engine block ``dst[i]``.

    Blocks read from a lower tier may be promoted into tier ``promote_tier``:
    ``promote_slots[i]`` is the reserved slot there, or -1. The promotion's outcome is
    reported under ``promote_op`` (failed positions among those with a slot).
    ``layerwise``: the engine waits for it layer by layer (vLLM's synchronous loads).
    """

    op_id: int
    tiers: list[int]
    slots: list[int]
    keys: list[bytes]
    dst: list[int]
    req_id: str = ""
    layerwise: bool = False
    promote_op: int = 0
    promote_tier: int = 0
    promote_slots: list[int] = field(default_factory=list)


@dataclass(slots=True)
class CopyOp:
    """Copy tier ``src_tier`` slots into tier ``dst_tier`` slots: the write-through cascade."""

    op_id: int
    src_tier: int
    src_slots: list[int]
    dst_tier: int
    dst_slots: list[int]
    keys: list[bytes]


@dataclass(slots=True)
class ProbeOp:
    """Ask shared tier ``tier`` which leading ``keys`` it holds (another instance wrote them).

    The answer is the number of leading keys found, reported as the failed set
    ``{n}`` (none failed: all found), so that ranks' answers combine by ``min``.
    """

    op_id: int
    tier: int
    keys: list[bytes]


@dataclass(slots=True)
class DiscardOp:
    """The registry dropped these blocks: the tier may forget them. Not reported."""

    tier: int
    slots: list[int]
    keys: list[bytes]


@dataclass(slots=True)
class Plan:
    """What to run, in this order: discards, probes, loads, saves, copies."""

    discards: list[DiscardOp] = field(default_factory=list)
    probes: list[ProbeOp] = field(default_factory=list)
    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)
    copies: list[CopyOp] = field(default_factory=list)

    def extend(self, other: Plan) -> None:
        """Append ``other``'s operations to this plan's."""
        self.discards.extend(other.discards)
        self.probes.extend(other.probes)
        self.loads.extend(other.loads)
        self.saves.extend(other.saves)
        self.copies.extend(other.copies)

    def __bool__(self) -> bool:
        return bool(self.discards or self.probes or self.loads or self.saves or self.copies)

    def all_failed(self) -> Report:
        """A report that fails every position of every reported operation but probes
        (its executor died, or has no storage)."""
        report: Report = {}
        for op in self.saves:
            report[op.op_id] = frozenset(range(len(op.slots)))
        for c in self.copies:
            report[c.op_id] = frozenset(range(len(c.dst_slots)))
        for ld in self.loads:
            every = frozenset(range(len(ld.slots)))
            report[ld.op_id] = every
            if ld.promote_op:
                report[ld.promote_op] = every
        return report

    def op_ids(self) -> list[int]:
        """Every operation id that expects a report (promotions included)."""
        out = [op.op_id for op in self.probes]
        for ld in self.loads:
            out.append(ld.op_id)
            if ld.promote_op:
                out.append(ld.promote_op)
        out.extend(op.op_id for op in self.saves)
        out.extend(op.op_id for op in self.copies)
        return out

    def __repr__(self) -> str:
        return (f"Plan(discards={len(self.discards)}, probes={len(self.probes)}, "
                f"loads={len(self.loads)}, saves={len(self.saves)}, copies={len(self.copies)})")


#: The executor's answer: op id -> positions that failed (for a probe: ``{n found}``).
Report = dict[int, frozenset[int]]
