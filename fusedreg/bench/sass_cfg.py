"""The generic half of `fusedreg bench --static`: sm_90 SASS listings parsed into functions, a
control-flow graph per function, its natural loops, and the hot path of each innermost loop that
moves data with 128-bit accesses.

Nothing here knows fusedreg's kernels: static_sass.py classifies them, does the budget arithmetic
and writes the report. The rules applied here (which code the CFG keeps, which path an iteration
takes, how 128-bit access counts give elements per iteration) are written down once, in
static_sass.py's docstring, because the report publishes that docstring as its method.
"""
from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass

# The memory accesses counted, and which of an op's bytes per element (reads, writes, the
# on-chip cache) each one moves.
_KIND = {"LDG": "reads", "LD": "reads", "STG": "writes", "ST": "writes", "LDS": "cached", "STS": "cached"}


# ----------------------------------------------------------------------------- SASS and its CFG

@dataclass
class Instr:
    addr: int
    pred: str  # "" or "@P0", "@!P1", ...
    op: str    # "LDG.E.128.CONSTANT"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def width(self) -> int:
        mods = self.op.split(".")[1:]
        return next((size for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1),
                                            ("S8", 1)) if mod in mods), 4)

    @property
    def vector(self) -> bool:
        return self.base in _KIND and self.width == 16

    @property
    def side_load(self) -> bool:
        return self.base in ("LDG", "LD") and self.width < 16


@dataclass
class Function:
    name: str  # mangled
    arch: str
    instrs: list[Instr]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> list[Function]:
    """The functions of `cuobjdump --dump-sass` output, instructions in address order."""
    functions, arch = [], ""
    for line in text.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif "Function : " in line:
            functions.append(Function(line.split("Function : ", 1)[1].strip(), arch, []))
        elif functions and (m := _LINE.search(line)):
            functions[-1].instrs.append(Instr(int(m[1], 16), (m[2] or "").strip(), m[3], m[4].strip()))
    return functions


def _target(ins: Instr) -> int | None:
    hexes = re.findall(r"0x([0-9a-f]+)", ins.args)
    return int(hexes[-1], 16) if hexes else None


class CFG:
    """Basic blocks, successors, and dominator sets of the blocks reachable from the entry."""

    def __init__(self, instrs: list[Instr]):
        instrs = [i for i in instrs if i.op != "NOP" and i.pred != "@!PT"]  # padding, never-taken
        addrs = [i.addr for i in instrs]

        def index(ins):  # a target that was padding lands on the next kept instruction
            tgt = _target(ins) if ins.base in ("BRA", "JMP") else None
            k = None if tgt is None else bisect.bisect_left(addrs, tgt)
            return k if k is not None and k < len(instrs) else None

        leaders = {0}
        for k, ins in enumerate(instrs):
            if ins.base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "BREAK"):
                leaders.add(k + 1)
                if index(ins) is not None:
                    leaders.add(index(ins))
        starts = sorted(s for s in leaders if s < len(instrs))
        self.blocks = [instrs[a:b] for a, b in zip(starts, starts[1:] + [len(instrs)])]
        block_of = {s: n for n, s in enumerate(starts)}
        self.succ: list[list[int]] = []
        for n, block in enumerate(self.blocks):
            last, nxt = block[-1], ([n + 1] if n + 1 < len(self.blocks) else [])
            # a guard, or a predicate operand (BRA.U !UP0, BRA P2, BRA.DIV UR4), makes it conditional
            conditional = bool(last.pred and last.pred != "@PT") or bool(re.match(r"!?U?P\d|UR\d", last.args))
            if last.base in ("BRA", "JMP"):
                taken = [] if index(last) is None else [block_of[index(last)]]
                self.succ.append(taken + (nxt if conditional else []))
            elif last.base in ("EXIT", "RET", "BRX", "JMX", "BREAK"):
                self.succ.append(nxt if conditional and last.base in ("EXIT", "RET") else [])
            else:
                self.succ.append(nxt)
        order, seen = [0], {0}
        for b in order:
            for s in self.succ[b]:
                if s not in seen:
                    seen.add(s)
                    order.append(s)
        self.preds = {b: [p for p in order if b in self.succ[p]] for b in order}
        self.dom = {b: set(order) for b in order}
        self.dom[0] = {0}
        changed = True
        while changed:  # dom(b) = {b} + intersection of dom(p) over the predecessors p
            changed = False
            for b in order[1:]:
                new = set.intersection(*(self.dom[p] for p in self.preds[b])) | {b}
                if new != self.dom[b]:
                    self.dom[b], changed = new, True

    def loops(self) -> dict[int, set[int]]:
        """Natural loops: header -> body, the bodies of one header's back edges merged."""
        body: dict[int, set[int]] = {}
        for u in self.dom:
            for h in self.succ[u]:
                if h in self.dom[u]:
                    nodes, stack = body.setdefault(h, {h}), [u]
                    while stack:
                        n = stack.pop()
                        if n not in nodes:
                            nodes.add(n)
                            stack.extend(self.preds[n])
        return body


# ----------------------------------------------------------------------------- hot loops

@dataclass
class Loop:
    header_addr: int
    instrs: int             # on the hot path of one iteration
    vector: dict            # access base (LDG, STG, LDS, STS) -> 128-bit accesses on that path
    calls: int              # CALLs on the path (their callees are not counted)
    local: int              # LDL/STL on the path
    variant_instrs: int | None  # the path without side loads, where it keeps every vector access


def _hot_path(cfg: CFG, header: int, body: set[int], avoid_side_loads: bool) -> list[Instr] | None:
    nodes = {b for b in body if b == header or not (avoid_side_loads and any(i.side_load for i in cfg.blocks[b]))}
    edges = {b: [s for s in cfg.succ[b] if s in nodes and s not in cfg.dom[b]] for b in nodes}
    indeg = Counter(s for b in nodes for s in edges[b])
    ready, topo = [b for b in nodes if indeg[b] == 0], []
    while ready:
        topo.append(ready.pop())
        for s in edges[topo[-1]]:
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)

    def weight(b):
        blk = cfg.blocks[b]
        return (sum(i.vector for i in blk), -any(i.base == "CALL" for i in blk), len(blk))

    best = {header: (weight(header), [header])}
    for b in topo:
        for s in edges[b] if b in best else []:
            w = tuple(x + y for x, y in zip(best[b][0], weight(s)))
            if s not in best or w > best[s][0]:
                best[s] = (w, best[b][1] + [s])
    ends = [best[b] for b in nodes if header in cfg.succ[b] and b in best]
    return [i for b in max(ends, key=lambda e: e[0])[1] for i in cfg.blocks[b]] if ends else None


def vector_loops(cfg: CFG) -> list[Loop]:
    """The innermost loops with 128-bit accesses, each measured along its hot path."""
    loops = {h: b for h, b in cfg.loops().items() if any(i.vector for n in b for i in cfg.blocks[n])}
    out = []
    for h, body in loops.items():
        if any(o != h and o in body and loops[o] < body for o in loops):
            continue  # holds another vector loop: not innermost
        path = _hot_path(cfg, h, body, avoid_side_loads=False)
        if not path:
            continue
        vector = Counter(i.base for i in path if i.vector)
        alt = _hot_path(cfg, h, body, avoid_side_loads=True) if any(i.side_load for i in path) else None
        same = alt is not None and Counter(i.base for i in alt if i.vector) == vector
        out.append(Loop(cfg.blocks[h][0].addr, len(path), dict(vector), sum(i.base == "CALL" for i in path),
                        sum(i.base in ("LDL", "STL") for i in path), len(alt) if same else None))
    return sorted(out, key=lambda lp: lp.header_addr)


def elems_per_iter(vector: dict, bytes_by_kind: dict) -> tuple[int, dict]:
    """(elements per iteration, {kind: share of them its 128-bit accesses carry}); the rule is in
    static_sass.py's docstring."""
    per_kind: Counter = Counter()
    for base, count in vector.items():
        per_kind[_KIND[base]] += count
    implied = {k: 16 * n / bytes_by_kind[k] for k, n in per_kind.items() if bytes_by_kind.get(k)}
    elems = round(max(implied.values(), default=0))
    return elems, {k: v / elems for k, v in implied.items()} if elems else {}
