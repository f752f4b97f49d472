"""The static SASS budget (`fusedreg bench --static`, fusedreg/bench/static_sass.py, sass_cfg.py).

First the loop finder on a small synthetic listing, then the real sm_90 objects of fusedreg_cuda
(the build cache's; ninja rebuilds only changed sources): every hot kernel is found and parsed,
spills nothing, moves the aligned path with 128-bit LDG/STG, and issues fewer instructions per
element than an H200 can at its memory floor. Kernels above BUDGET_FRACTION of that budget are
strict xfails: bringing one under turns its check into a hard one.
"""
import math

import pytest

from fusedreg import cli
from fusedreg.bench import sass_cfg
from fusedreg.bench import static_sass as S

# A grid-stride loop: an aligned path (LDG.128 -> optional bias load -> optional slow-path CALL ->
# STG.128) and a scalar path, then the latch; after the EXIT, the padding self-branch and a
# subroutine with its own loop and spills, reached only by CALL.
SYNTHETIC = """
arch = sm_90
\t\tFunction : _Z6kernelPKfPfi
        /*0000*/                   MOV R1, c[0x0][0x28] ;                          /* 0x0 */
        /*0010*/                   ISETP.GE.AND P0, PT, R0, R2, PT ;               /* 0x0 */
        /*0020*/               @P0 EXIT ;                                          /* 0x0 */
        /*0030*/                   MOV R3, RZ ;                                    /* 0x0 */
        /*0040*/                   ISETP.NE.AND P1, PT, R4, RZ, PT ;               /* 0x0 */
        /*0050*/              @!P1 BRA 0x120 ;                                     /* 0x0 */
        /*0060*/                   LDG.E.128 R8, desc[UR4][R6.64] ;                /* 0x0 */
        /*0070*/                   FMUL R8, R8, R5 ;                               /* 0x0 */
        /*0080*/              @!P3 BRA 0xb0 ;                                      /* 0x0 */
        /*0090*/                   LDG.E.U16 R12, desc[UR4][R14.64] ;              /* 0x0 */
        /*00a0*/                   FADD R9, R9, R12 ;                              /* 0x0 */
        /*00b0*/              @!P2 BRA 0xe0 ;                                      /* 0x0 */
        /*00c0*/                   MOV R20, 0xe0 ;                                 /* 0x0 */
        /*00d0*/                   CALL.REL.NOINC 0x200 ;                          /* 0x0 */
        /*00e0*/                   FMUL R10, R10, R5 ;                             /* 0x0 */
        /*00f0*/                   FMUL R11, R11, R5 ;                             /* 0x0 */
        /*0100*/                   STG.E.128 desc[UR4][R6.64], R8 ;                /* 0x0 */
        /*0110*/                   BRA 0x150 ;                                     /* 0x0 */
        /*0120*/                   LDG.E R8, desc[UR4][R6.64] ;                    /* 0x0 */
        /*0130*/                   FMUL R8, R8, R5 ;                               /* 0x0 */
        /*0140*/                   STG.E desc[UR4][R6.64], R8 ;                    /* 0x0 */
        /*0150*/                   IADD3 R0, R0, 0x4, RZ ;                         /* 0x0 */
        /*0160*/                   ISETP.GE.AND P0, PT, R0, R2, PT ;               /* 0x0 */
        /*0170*/              @!P0 BRA 0x40 ;                                      /* 0x0 */
        /*0180*/                   EXIT ;                                          /* 0x0 */
        /*0190*/                   BRA 0x190 ;                                     /* 0x0 */
        /*01a0*/                   NOP ;                                           /* 0x0 */
        /*0200*/                   STL [R1], R3 ;                                  /* 0x0 */
        /*0210*/                   IADD3 R3, R3, -0x1, RZ ;                        /* 0x0 */
        /*0220*/                   ISETP.NE.AND P0, PT, R3, RZ, PT ;               /* 0x0 */
        /*0230*/               @P0 BRA 0x210 ;                                     /* 0x0 */
        /*0240*/                   LDL R3, [R1] ;                                  /* 0x0 */
        /*0250*/                   RET.REL.NODEC R20 0x0 ;                         /* 0x0 */
"""


def test_loop_finder_on_synthetic_sass():
    (fn,) = sass_cfg.parse_sass(SYNTHETIC)
    assert fn.arch == "sm_90" and fn.name == "_Z6kernelPKfPfi" and len(fn.instrs) == 33
    cfg = sass_cfg.CFG(fn.instrs)
    # the subroutine's loop and the padding self-branch are unreachable: one loop, at 0x40
    assert [cfg.blocks[h][0].addr for h in cfg.loops()] == [0x40]
    (loop,) = sass_cfg.vector_loops(cfg)
    # header 2 + LDG.128 block 3 + bias 2 + CALL guard 1 + STG.128 block 4 + latch 3; the CALL block
    # (slow path) and the scalar path are left out
    assert (loop.header_addr, loop.instrs, loop.calls, loop.local) == (0x40, 15, 0, 0)
    assert loop.vector == {"LDG": 1, "STG": 1}
    assert loop.variant_instrs == 13  # without the bias load
    assert sum(i.base in ("LDL", "STL") for b in cfg.dom for i in cfg.blocks[b]) == 0  # spills: subroutine only


def test_elements_per_iteration_rule():
    assert sass_cfg.elems_per_iter({"LDG": 1, "STG": 1}, {"reads": 4, "writes": 4}) == (
        4, {"reads": 1, "writes": 1})
    # bf16 dropout_add (x, residual read; out written), unrolled twice by the compiler
    assert sass_cfg.elems_per_iter({"LDG": 4, "STG": 2}, {"reads": 4, "writes": 2})[0] == 16
    # bf16 params, fp32 states: p, g, 2 x m, 2 x v loads; p, 2 x m, 2 x v stores per 8 elements
    assert sass_cfg.elems_per_iter({"LDG": 6, "STG": 5}, {"reads": 12, "writes": 10})[0] == 8
    # a cache pass whose stores are only a quarter 128-bit
    elems, share = sass_cfg.elems_per_iter({"LDS": 4, "STG": 1}, {"writes": 2, "cached": 2})
    assert elems == 32 and share["writes"] == 0.25


def test_budget_and_names():
    assert [round(S.budget(b), 1) for b in (4, 8, 6, 28)] == [31.1, 62.2, 46.7, 217.8]
    enums = {"Pass": ["kForward", "kBackward", "kBackwardEval"]}
    name = ("void fusedreg::(anonymous namespace)::bn_elemt_rows_kernel<c10::BFloat16, 8, "
            "(fusedreg::(anonymous namespace)::Pass)2>(c10::BFloat16 const*)")
    assert S.template(name, enums) == ("bn_elemt_rows_kernel", ["c10::BFloat16", "8", "Pass::kBackwardEval"])
    kernel = S.classify(name, enums)
    assert (kernel.op, kernel.dtype, kernel.floor) == ("bn elementwise bwd eval, rows", "bfloat16", 4)
    assert S.classify(name.replace(", 8,", ", 1,"), enums) is False  # the misaligned fallback
    adamw = S.classify("void fusedreg::(anonymous namespace)::adamw_kernel<4, c10::BFloat16, float>("
                       "fusedreg::MultiTensorTable<4>)", enums)
    assert (adamw.dtype, adamw.reads, adamw.writes) == ("bfloat16 (float32 states)", 12, 10)
    # dropout_fwd_kernel<scalar_t, kAdd, kFast, kVec>: fast, peeled-head vector, scalar fallback
    dropout = "void fusedreg::(anonymous namespace)::dropout_fwd_kernel<c10::Half, {}>(c10::Half const*)"
    fast = S.classify(dropout.format("true, true, true"), enums)
    peeled = S.classify(dropout.format("true, false, true"), enums)
    assert (fast.op, fast.variant, fast.reads, fast.writes) == ("dropout_add +bias", "dropout_add, no bias", 4, 2)
    assert (peeled.op, peeled.variant) == ("dropout_add +bias, peeled head", "dropout_add, no bias, peeled head")
    assert "no Philox" in peeled.others and S.classify(dropout.format("false, false, true"), enums).op == (
        "dropout (fwd = bwd), peeled head")
    assert S.classify(dropout.format("false, false, false"), enums) is False


# ----------------------------------------------------------------------------- the real kernels

DTYPES = ("float32", "bfloat16", "float16")
HOT = [(op, dt) for dt in DTYPES for op in (
    "dropout (fwd = bwd)", "dropout_add +bias", "dropout_add, no bias",
    "dropout (fwd = bwd), peeled head", "dropout_add +bias, peeled head", "dropout_add, no bias, peeled head",
    "adamw", "adamw amsgrad",
    "clip norm L2", "clip norm L1", "clip norm Inf", "clip norm P", "clip scale",
    "bn on-chip fwd, planes", "bn on-chip fwd, rows", "bn on-chip bwd, planes", "bn on-chip bwd, rows",
    "bn fwd stats (split), planes", "bn fwd stats (split), rows",
    "bn bwd reduce (split), planes", "bn bwd reduce (split), rows",
    *(f"bn elementwise {what}, {layout}" for what in ("fwd (eval; split 2nd pass)", "bwd", "bwd eval")
      for layout in ("planes", "rows")))] + [
    ("adamw", "bfloat16 (float32 states)"), ("adamw amsgrad", "bfloat16 (float32 states)"),
    ("adamw", "float32 (bfloat16 states)"),
    # pure-bf16 training: stochastic rounding of bfloat16 params and/or moments
    *((op, dt) for op in ("adamw +SR", "adamw amsgrad +SR")
      for dt in ("bfloat16", "bfloat16 (float32 states)", "float32 (bfloat16 states)"))]

BUDGET_FRACTION = 0.70
# Known today; a strict xfail fails once the kernel improves, so the list must shrink with it.
OVER_BUDGET: set = set()
# pure bf16 + SR: half a Philox call per element (16 random bits per rounded value) against 14 B/param
ABOVE_FRACTION = OVER_BUDGET | {("adamw +SR", "bfloat16"), ("adamw amsgrad +SR", "bfloat16")}
# Hot loops whose 128-bit accesses move less than the floor (partly 32-bit stores): none today.
NOT_FULLY_VECTORISED: set = set()


def _cases(known: set, reason: str):
    return [pytest.param(op, dt, id=f"{op}-{dt}", marks=pytest.mark.xfail(strict=True, reason=reason)
                         if (op, dt) in known else ()) for op, dt in HOT]


@pytest.fixture(scope="module")
def report():
    reason = S.missing_tools()
    if reason:
        pytest.skip(f"static SASS analysis impossible here: {reason}")
    doc = S.analyse(S.sm90_objects(log=lambda line: None), set(DTYPES))
    rows = {(r["kernel"], r["dtype"]): r for r in doc["rows"]}
    assert len(rows) == len(doc["rows"]), "two kernels map to one row"
    return doc, rows


@pytest.mark.build
def test_every_kernel_is_classified_and_every_hot_one_found(report):
    doc, rows = report
    assert doc["unclassified"] == []
    assert sorted(set(HOT) - set(rows)) == []
    for key in HOT:
        row = rows[key]
        assert row["regs"] and 0 < row["instr_per_elem"] < math.inf, key
        assert all(e > 0 for e in row["elems_per_iter"]) and all(i > 0 for i in row["loop_instrs"]), key
    for op in ("bn finalize fwd", "bn finalize bwd"):  # one value per channel: nothing to budget
        assert "no elementwise loop" in rows[(op, "float32")]["note"]


@pytest.mark.build
def test_no_spills(report):
    _, rows = report
    assert {key: row["spills"] for key, row in rows.items() if row["spills"]} == {}
    assert [key for key, row in rows.items() if any(lp["local"] for lp in row["loops"])] == []


@pytest.mark.build
@pytest.mark.parametrize("op", ["dropout (fwd = bwd)", "dropout_add +bias", "adamw", "adamw amsgrad", "clip scale"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_paths_use_128_bit_loads_and_stores(report, op, dtype):
    row = report[1][(op, dtype)]
    assert row["vec"] == "yes/yes" and row["bytes_check"], row


@pytest.mark.build
@pytest.mark.parametrize("op, dtype", _cases(NOT_FULLY_VECTORISED, "stores partly 32-bit"))
def test_hot_loops_move_the_floor_with_128_bit_accesses(report, op, dtype):
    row = report[1][(op, dtype)]
    assert row["bytes_check"], f"{row['vector_global_bytes']} of {row['bytes_per_elem']} B/elem: {row['vec']}"


@pytest.mark.build
@pytest.mark.parametrize("op, dtype", _cases(OVER_BUDGET, "known to exceed the issue budget"))
def test_within_issue_budget(report, op, dtype):
    assert report[1][(op, dtype)]["pct_budget"] < 100


@pytest.mark.build
@pytest.mark.parametrize("op, dtype", _cases(ABOVE_FRACTION, f"known above {BUDGET_FRACTION:.0%} of budget"))
def test_within_budget_fraction(report, op, dtype):
    assert report[1][(op, dtype)]["pct_budget"] < 100 * BUDGET_FRACTION


@pytest.mark.build
def test_cli_writes_table_and_json(report, tmp_path, monkeypatch, capsys):
    doc, _ = report
    monkeypatch.setattr(S, "analyse", lambda objects, dtypes: dict(doc, rows=[r for r in doc["rows"]
                                                                             if r["dtype"] in dtypes]))
    out = tmp_path / "sass.json"
    assert cli.main(["bench", "--static", "--dtype", "bf16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| dropout (fwd = bwd) | bfloat16 |" in printed and "| float32 |" not in printed
    assert out.is_file() and "static, sm_90" in out.read_text()
    assert out.with_suffix(".md").read_text().count("| dropout") >= 3
