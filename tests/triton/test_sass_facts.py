"""Machine-code facts of the GPU kernels, read from the ahead-of-time build for sm_80 and sm_90.

The kernels are memory-bound, so what decides their speed shows in the SASS: no local memory
(spills), 128-bit global loads and stores in the loop that moves the rows, registers within
the budget of the occupancy the launchers assume (docs/kernels.md), the half-precision
low-rank tile on the tensor cores, and no barrier in the fp32 position forward's batch loop
(a barrier there means the rows cross shared memory every batch element; the bf16 forward's
tensor-core tile does send them through it, and the H200 measured that the cheaper trade,
docs/kernels.md). Triton kernels come from `dept_kernels.triton.precompile` (the variants of
the LLaMA-7B benchmark: int64 ids, all-bf16 or all-fp32 tensors, no tasks); CUDA kernels from
`nvcc -cubin` with the JIT build's flags. Both are disassembled with the `nvdisasm` that
Triton ships. ~40 s on two cores with a cold Triton cache.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from triton import knobs

from dept_kernels import check_build
from dept_kernels.triton import aot_bias, precompile
from dept_kernels.triton import dept_embedding as emb

try:
    # The disassembler and resource dumper that ship with Triton's CUDA backend.
    NVDISASM, CUOBJDUMP = knobs.nvidia.nvdisasm.path, knobs.nvidia.cuobjdump.path
except RuntimeError as exc:
    pytest.skip(f"Triton's CUDA tools are missing: {exc}", allow_module_level=True)

CCS = (80, 90)
# Blocks per SM each launcher sizes its grid for.
CTAS_PER_SM = {**emb.CTAS_PER_SM, **aot_bias.CTAS_PER_SM}
THREADS = 32 * emb.NUM_WARPS
REGISTERS_PER_SM = 65536
# ptxas allocates registers per thread in multiples of 8.
REGISTER_GRANULE = 8


def register_budget(ctas_per_sm: int, threads: int = THREADS) -> int:
    """The most registers per thread that let `ctas_per_sm` blocks of `threads` share an SM."""
    per_thread = REGISTERS_PER_SM // (ctas_per_sm * threads)
    return per_thread // REGISTER_GRANULE * REGISTER_GRANULE


# ----------------------------------------------------------------------------- SASS reading

_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")
_FUNCTION = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")


@dataclasses.dataclass
class Function:
    """One kernel's SASS: (address, instruction text without predicate) and label addresses."""

    name: str
    code: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    labels: dict[str, int] = dataclasses.field(default_factory=dict)

    def loops(self) -> list[tuple[int, int]]:
        """(first, last) addresses of each loop: a branch back to an earlier label."""
        spans = []
        for address, text in self.code:
            branch = _BRANCH.search(text)
            if branch and self.labels.get(branch[1], address + 1) <= address:
                spans.append((self.labels[branch[1]], address))
        return spans

    def ops(self, span: tuple[int, int] | None = None) -> list[str]:
        """The opcodes (with modifiers, e.g. LDG.E.128) of the function or of a span of it."""
        lo, hi = span or (0, 1 << 62)
        return [text.split()[0] for address, text in self.code if lo <= address <= hi]

    def own_ops(self, span: tuple[int, int]) -> list[str]:
        """The opcodes of a loop outside the loops nested in it."""
        inner = [(lo, hi) for lo, hi in self.loops() if span[0] <= lo <= hi <= span[1]]
        inner.remove(span)
        return [
            text.split()[0]
            for address, text in self.code
            if span[0] <= address <= span[1] and not any(lo <= address <= hi for lo, hi in inner)
        ]


def parse(listing: str) -> dict[str, Function]:
    """Every function of an nvdisasm listing, by (mangled) name."""
    functions: dict[str, Function] = {}
    current, pending = None, []
    for line in listing.splitlines():
        if section := _FUNCTION.match(line):
            current = functions.setdefault(section[1], Function(section[1]))
        elif current is None:
            continue
        elif label := _LABEL.match(line):
            pending.append(label[1])
        elif instruction := _INSTRUCTION.search(line):
            address = int(instruction[1], 16)
            # The predicate (@P0, @!PT, ...) is not part of the opcode.
            text = re.sub(r"^@!?U?P\w+\s+", "", instruction[2])
            current.labels.update(dict.fromkeys(pending, address))
            pending = []
            current.code.append((address, text))
    return functions


def disassemble(cubin: Path) -> dict[str, Function]:
    """Every function of a cubin, by (mangled) name."""
    done = subprocess.run([NVDISASM, "-c", str(cubin)], capture_output=True, text=True, check=True)
    return parse(done.stdout)


def resources(cubin: Path) -> dict[str, dict[str, int]]:
    """Per function: REG, LOCAL, SHARED, ... as cuobjdump reports them."""
    done = subprocess.run(
        [CUOBJDUMP, "--dump-resource-usage", str(cubin)],
        capture_output=True,
        text=True,
        check=True,
    )
    usage, name = {}, None
    for line in done.stdout.splitlines():
        if function := re.match(r"\s*Function (\S+):", line):
            name = function[1]
        elif name is not None and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return usage


def wide(ops: list[str], kind: str) -> int:
    """Count of 128-bit global accesses of `kind` (LDG or STG), in any spelling
    (LDG.E.128, LDG.E.128.CONSTANT, LDG.E.EL.128, ...)."""
    return sum(op.startswith(kind + ".") and ".128" in op for op in ops)


def local_memory(ops: list[str]) -> int:
    return sum(op.split(".")[0] in ("LDL", "STL") for op in ops)


# ----------------------------------------------------------------------------- the kernels


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """A Triton variant and the facts its machine code must show.

    Its registers must fit the blocks per SM its launcher assumes (`CTAS_PER_SM`). `loop`:
    whether its rows move in a loop (then the 128-bit accesses must be in it);
    `stores_in_loop`: whether that loop stores them (the reduce kernels store one sum after
    it; the segment kernel's is a reduced (d,) vector, stored 64 bits wide);
    `barrier_free_loop`: whether the batch loop must hold no barrier; `tensor_cores`: whether
    the low-rank tile must be formed by matrix instructions (HMMA, or sm_90's HGMMA).
    """

    kernel: str
    dtype: torch.dtype
    constexprs: tuple[tuple[str, object], ...] = ()
    loop: bool = True
    stores_in_loop: bool = True
    barrier_free_loop: bool = False
    tensor_cores: bool = False

    @property
    def label(self) -> str:
        return f"{self.kernel.strip('_')}-{str(self.dtype).split('.')[-1]}"

    def matches(self, variant: precompile.Variant) -> bool:
        if variant.kernel != self.kernel:
            return False
        pointers = dict(variant.pointers)
        # The reduce kernels write fp32 whatever the gradient's dtype.
        data = {n: t for n, t in pointers.items() if not (n == "out_ptr" and "reduce" in n)}
        if "g_ptr" in pointers:
            data = {"g_ptr": pointers["g_ptr"]}
        if any(not t.is_floating_point and t != torch.int64 for t in pointers.values()):
            return False
        if {t for t in data.values() if t.is_floating_point} != {self.dtype}:
            return False
        return dict(self.constexprs).items() <= dict(variant.constexprs).items()


def _forward(kernel: str, dtype: torch.dtype, **kw) -> TritonKernel:
    constexprs = (("HAS_TASKS", False),)
    if kernel == "_fwd_position_kernel":
        constexprs += (("HAS_LORA", True),)
    return TritonKernel(kernel, dtype, constexprs, **kw)


TRITON_KERNELS = [
    _forward("_fwd_position_kernel", torch.bfloat16, tensor_cores=True),
    _forward("_fwd_position_kernel", torch.float32, barrier_free_loop=True),
    _forward("_fwd_rows_kernel", torch.bfloat16, loop=False, tensor_cores=True),
    _forward("_fwd_rows_kernel", torch.float32, loop=False),
    TritonKernel("_reduce_position_kernel", torch.bfloat16, stores_in_loop=False),
    TritonKernel("_reduce_position_kernel", torch.float32, stores_in_loop=False),
    TritonKernel("_reduce_segment_kernel", torch.bfloat16, stores_in_loop=False),
    TritonKernel("_gather_add_kernel", torch.bfloat16, loop=False),
]


@pytest.fixture(scope="module")
def triton_cubins(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """(kernel label, cc) -> cubin of the one variant each TRITON_KERNELS entry selects."""
    directory = tmp_path_factory.mktemp("triton_cubins")
    items = precompile.variants()
    chosen = {}
    for spec in TRITON_KERNELS:
        found = [v for v in items if spec.matches(v)]
        assert len(found) == 1, (spec.label, [v.label for v in found])
        chosen[spec.label] = found[0]
    results = precompile.compile_all(CCS, list(chosen.values()), cubin_dir=str(directory))
    failures = [f"sm_{r.cc} {r.label}: {r.error}" for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    index = {v: i for i, v in enumerate(items)}
    return {
        (label, cc): directory / precompile.cubin_name(index[v], cc)
        for label, v in chosen.items()
        for cc in CCS
    }


def _hot_loop(function: Function, spec: TritonKernel) -> tuple[int, int]:
    """The loop moving the rows: holding 128-bit stores (forward) or loads (reduce); the
    largest such loop when there are several (prompt and visual copies have their own)."""
    kind = "STG" if spec.stores_in_loop else "LDG"
    spans = [span for span in function.loops() if wide(function.ops(span), kind)]
    assert spans, f"{spec.label}: no loop with 128-bit {kind}"
    return max(spans, key=lambda span: len(function.ops(span)))


def _token_loop(function: Function) -> tuple[int, int]:
    """The position forward's batch loop over the token rows: the loop with 128-bit stores
    whose rows come through a gather (a 64-bit id load feeds the next step's addresses)."""
    spans = [
        span
        for span in function.loops()
        if wide(function.ops(span), "STG") and wide(function.ops(span), "LDG")
    ]
    ids = [s for s in spans if any(op.startswith("LDG.E.64") for op in function.ops(s))]
    assert ids, "no batch loop that loads ids and stores 128-bit rows"
    return max(ids, key=lambda span: len(function.ops(span)))


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc}")
@pytest.mark.parametrize("spec", TRITON_KERNELS, ids=lambda s: s.label)
def test_triton_kernel_machine_code(triton_cubins, spec, cc):
    cubin = triton_cubins[(spec.label, cc)]
    (function,) = disassemble(cubin).values()
    (usage,) = resources(cubin).values()
    ops = function.ops()
    assert usage["LOCAL"] == usage["STACK"] == local_memory(ops) == 0, (usage, "spills")
    ctas = CTAS_PER_SM[spec.kernel]
    budget = register_budget(ctas)
    assert usage["REG"] <= budget, (
        f"{usage['REG']} registers > {budget}, the budget of {ctas} blocks per SM"
    )
    scope = function.ops(_hot_loop(function, spec)) if spec.loop else ops
    assert wide(scope, "LDG"), "no 128-bit global load where the rows move"
    if spec.stores_in_loop:
        assert wide(scope, "STG"), "no 128-bit global store where the rows move"
    elif spec.kernel == "_reduce_position_kernel":
        assert wide(ops, "STG"), "no 128-bit global store"
    if spec.tensor_cores:
        assert [op for op in ops if op.startswith(("HMMA", "HGMMA"))], "no tensor-core MMA"
    if spec.barrier_free_loop:
        loop = function.ops(_token_loop(function))
        bars = [op for op in loop if op.startswith("BAR")]
        shared = [op for op in loop if op.startswith(("STS", "LDS", "LDSM"))]
        assert not bars and not shared, (
            f"batch loop crosses shared memory: {len(bars)} barriers, {len(shared)} "
            f"shared accesses per batch element"
        )


# ----------------------------------------------------------------------------- CUDA kernels

NVCC = shutil.which("nvcc")


@dataclasses.dataclass(frozen=True)
class CudaKernel:
    """A CUDA kernel instantiation (its struct and template arguments, as demangled) and the
    facts to check: `loop` as for Triton, `barrier_free_loop` for the batch loop."""

    struct: str
    loop: bool = True
    barrier_free_loop: bool = False


# The 16-byte-vector instantiations: what runs on aligned rows of real models.
CUDA_KERNELS = [
    CudaKernel("ForwardSharedDelta<__nv_bfloat16, 8>", barrier_free_loop=True),
    CudaKernel("ForwardSharedDelta<float, 4>", barrier_free_loop=True),
    CudaKernel("ForwardPerRow<__nv_bfloat16, 8, true>", loop=False),
    CudaKernel("ForwardPerRow<float, 4, true>", loop=False),
    CudaKernel("SegmentSumChunks<__nv_bfloat16, 8>"),
    CudaKernel("GatherAdd<__nv_bfloat16, __nv_bfloat16, 8>", loop=False),
]
# Blocks per SM the CUDA kernels are built for (`__launch_bounds__` in csrc/cuda/common.cuh).
CUDA_CTAS_PER_SM = 4
CUDA_THREADS = 128


@pytest.fixture(scope="module")
def cuda_functions(tmp_path_factory) -> dict[tuple[str, int], tuple[Function, dict[str, int]]]:
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    directory = tmp_path_factory.mktemp("cuda_cubins")
    out = {}
    for source in check_build.cuda_sources():
        for cc in CCS:
            cubin = directory / f"{source.stem}_sm{cc}.cubin"
            cmd = check_build.nvcc_command(NVCC, source, cc, cubin, cubin=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            functions, usage = disassemble(cubin), resources(cubin)
            names = check_build.demangle(list(functions))
            for mangled, function in functions.items():
                out[(names[mangled], cc)] = (function, usage[mangled])
    return out


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc}")
@pytest.mark.parametrize("spec", CUDA_KERNELS, ids=lambda s: re.sub(r"\W+", "", s.struct))
def test_cuda_kernel_machine_code(cuda_functions, spec, cc):
    key = (spec.struct, cc)
    assert key in cuda_functions, sorted(name for name, c in cuda_functions if c == cc)
    function, usage = cuda_functions[key]
    ops = function.ops()
    assert usage["LOCAL"] == usage["STACK"] == local_memory(ops) == 0, (usage, "spills")
    budget = register_budget(CUDA_CTAS_PER_SM, CUDA_THREADS)
    assert usage["REG"] <= budget, usage
    assert wide(ops, "LDG") and wide(ops, "STG"), "no 128-bit global load or store"
    if spec.loop:
        spans = [s for s in function.loops() if wide(function.ops(s), "LDG")]
        assert spans, "no loop with 128-bit loads"
    if spec.barrier_free_loop:
        # The batch loop: barriers only in the loop nested in it that forms a task's delta
        # (the factors staged in shared memory), never per batch element.
        spans = [s for s in function.loops() if wide(function.ops(s), "STG")]
        assert spans, "no batch loop with 128-bit stores"
        for span in spans:
            assert not [op for op in function.own_ops(span) if op.startswith("BAR")], span


def test_sass_reader_finds_loops_and_barriers():
    # A hand-written listing in nvdisasm's format: one loop (back-edge to .L_x_1) holding a
    # barrier and a 128-bit store, predicated instructions read without their predicate.
    listing = """
        .section .text.k,"ax",@progbits
        /*0000*/  MOV R1, c[0x0][0x28] ;
    .L_x_1:
        /*0010*/  @P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/  BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/  @!P1 STG.E.128 desc[UR4][R6.64], R4 ;
        /*0040*/  @P2 BRA `(.L_x_1) ;
        /*0050*/  BRA `(.L_x_2) ;
    .L_x_2:
        /*0060*/  EXIT ;
    """
    (function,) = parse(listing).values()
    assert function.loops() == [(0x10, 0x40)]
    ops = function.ops((0x10, 0x40))
    assert wide(ops, "LDG") == 1 and wide(ops, "STG") == 1
    assert [op for op in ops if op.startswith("BAR")] == ["BAR.SYNC.DEFER_BLOCKING"]
    assert register_budget(4) == 128 and register_budget(6) == 80 and register_budget(8) == 64
