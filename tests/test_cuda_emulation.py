"""The CUDA kernels' index math, masks, vector widths and reduction order, checked on the CPU.

`tests/cuda/emulate.cu` is built with nvcc and -DDEPT_KERNELS_EMULATE, which makes the
launchers of `csrc/cuda` run every thread of their kernels on the host. The kernels use no
warp intrinsics, and their one block-cooperative step (the factors staged in shared memory
before a low-rank delta is formed) is made whole by each thread under emulation, so a serial
run computes what the GPU does; the split of that copy among the threads is the one part not
exercised here. The outputs are compared with the eager torch backend. It needs nvcc, not a
GPU (~15 s to build).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

from dept_kernels import backends

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")

CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FLOATS = list(CODE)
# The eager torch backend: the formulas the kernels must match.
REFERENCE = backends.load("torch")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("emulate") / "emulate"
    sources = [ROOT / "tests/cuda/emulate.cu", *sorted((ROOT / "csrc/cuda").glob("*.cu"))]
    flags = ["-O1", "-std=c++17", "-DDEPT_KERNELS_EMULATE", *COMMON_NVCC_FLAGS]
    cmd = [NVCC, *flags, "-arch=sm_80", f"-I{ROOT / 'csrc/cuda'}", *map(str, sources)]
    subprocess.run([*cmd, "-o", str(exe)], check=True, capture_output=True)
    return exe


def _write(path: Path, tensor: torch.Tensor) -> None:
    t = tensor.contiguous()
    if t.element_size() == 2 and t.is_floating_point():
        t = t.view(torch.int16)
    path.write_bytes(t.numpy().tobytes())


def _read(path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = bytearray(path.read_bytes())
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def _run(exe: Path, op: str, workdir: Path, *args: int) -> None:
    subprocess.run([str(exe), op, str(workdir), *map(str, args)], check=True)


FORWARD_CASES = [
    # batch, seq, m, d, r, L, mode, extra weight columns, misaligned weight
    (3, 5, 2, 40, 3, 7, "position", 0, False),
    (3, 5, 2, 37, 3, 7, "position", 0, False),  # d not a multiple of the vector width
    (5, 9, 0, 48, 1, 9, "position", 0, False),  # m = 0, r = 1, batch split over grid z
    (7, 20, 3, 64, 33, 24, "position", 8, False),  # s < L, strided weight, two row tiles
    (2, 6, 4, 40, 5, 6, "position", 1, False),  # row stride breaks 16-byte alignment
    (2, 6, 4, 40, 5, 6, "position", 0, True),  # misaligned weight pointer
    (1, 17, 5, 96, 256, 17, "position", 0, False),  # B = 1, r = 256
    (9, 40, 3, 64, 4, 40, "position", 0, False),  # 5 batches per block: the pipeline
    (4, 6, 2, 40, 3, 11, "rows", 0, False),
    (3, 7, 0, 33, 2, 7, "rows", 0, False),
    (3, 5, 2, 40, 0, 0, "none", 0, False),
    (2, 3, 0, 21, 0, 0, "none", 0, False),
    (2, 0, 3, 40, 2, 4, "position", 0, False),  # s = 0: prompt rows only
]


# Per-task parameters: (forward case, task of each sample); T = max task + 2, so the last
# task is never used and a wrong task stride reads other values.
TASK_CASES = [
    ((5, 9, 2, 40, 3, 9, "position", 0, False), (1, 0, 1, 2, 0)),  # batch split over grid z
    ((4, 5, 0, 37, 2, 7, "position", 0, False), (2, 2, 0, 1)),  # scalar columns, m = 0
    ((9, 40, 3, 64, 4, 40, "position", 0, False), (0, 1, 0, 1, 2, 2, 0, 1, 2)),  # pipeline
    ((1, 17, 5, 96, 8, 17, "position", 0, False), (2,)),
    ((5, 6, 2, 40, 3, 11, "rows", 0, False), (1, 0, 1, 2, 0)),  # samples shorter than a tile
    ((3, 20, 3, 48, 4, 24, "rows", 0, False), (1, 1, 0)),  # two tiles per sample
    ((5, 3, 2, 40, 0, 0, "none", 0, False), (1, 0, 1, 2, 0)),  # per-task prompts only
]


# Visual rows after the token rows: (forward case, tasks, (n_v, extra rows, extra columns) of
# the strided source the rows are read from in place). Extra columns of 1 break the 16-byte
# alignment of the rows (scalar path), 8 keep it for half types.
VISUAL_CASES = [
    ((3, 5, 2, 40, 3, 7, "position", 0, False), None, (7, 0, 0)),
    ((3, 5, 2, 37, 3, 7, "position", 0, False), None, (1, 0, 0)),  # scalar columns, n_v = 1
    ((9, 40, 3, 64, 4, 40, "position", 0, False), None, (17, 2, 8)),  # pipeline, strided
    ((5, 9, 0, 48, 1, 9, "position", 0, False), None, (3, 1, 1)),  # misaligned rows, m = 0
    ((4, 6, 2, 40, 3, 11, "rows", 0, False), None, (7, 0, 0)),
    ((3, 7, 0, 33, 2, 7, "rows", 0, False), None, (5, 1, 3)),
    ((3, 5, 2, 40, 0, 0, "none", 0, False), None, (7, 1, 8)),
    ((2, 0, 3, 40, 2, 4, "position", 0, False), None, (2, 0, 0)),  # s = 0
    ((5, 9, 2, 40, 3, 9, "position", 0, False), (1, 0, 1, 2, 0), (7, 0, 0)),
    ((5, 6, 2, 40, 3, 11, "rows", 0, False), (1, 0, 1, 2, 0), (1, 2, 8)),
    ((5, 3, 2, 40, 0, 0, "none", 0, False), (1, 0, 1, 2, 0), (7, 0, 1)),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward(emulator, tmp_path, dtype, case):
    _check_forward(emulator, tmp_path, dtype, case, None)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case,tasks", TASK_CASES)
def test_forward_tasks(emulator, tmp_path, dtype, case, tasks):
    _check_forward(emulator, tmp_path, dtype, case, tasks)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case,tasks,visual", VISUAL_CASES)
def test_forward_visual(emulator, tmp_path, dtype, case, tasks, visual):
    _check_forward(emulator, tmp_path, dtype, case, tasks, visual)


def _check_forward(
    emulator: Path,
    tmp_path: Path,
    dtype: torch.dtype,
    case: tuple,
    tasks: tuple | None,
    visual_layout: tuple[int, int, int] = (0, 0, 0),
) -> None:
    batch, seq, m, d, r, max_len, mode, extra, shift = case
    gen = torch.Generator().manual_seed(sum(case[:6]))
    vocab = 50
    # Parameters of T tasks carry a leading T dim; none without tasks.
    lead = () if tasks is None else (max(tasks) + 2,)
    table = torch.randn(vocab, d + extra, generator=gen).to(dtype)
    weight = table[:, :d]
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    prompt = torch.randn(*lead, m, d, generator=gen).to(dtype) if m else None
    lora = mode != "none"
    a = torch.randn(*lead, max_len, r, generator=gen) if lora else None
    b = torch.randn(*lead, r, d, generator=gen) if lora else None
    rows = torch.randint(0, max_len, (batch, seq), generator=gen) if mode == "rows" else None
    task_ids = order = None
    if tasks is not None:
        task_ids = torch.tensor(tasks)
        order = torch.argsort(task_ids, stable=True)
        _write(tmp_path / "tasks.bin", task_ids)
        _write(tmp_path / "order.bin", order)
    # The visual rows: a window of a bigger buffer, read in place through its strides.
    n_v, extra_rows, extra_cols = visual_layout
    source = torch.randn(batch, n_v + extra_rows, d + extra_cols, generator=gen).to(dtype)
    visual = source[:, extra_rows:, extra_cols:]
    if n_v:
        # The file starts at visual[0, 0, 0]: the emulator's pointer to the window.
        start = extra_rows * source.shape[2] + extra_cols
        _write(tmp_path / "visual.bin", source.reshape(-1)[start:])
    scaling = 0.75
    _write(tmp_path / "ids.bin", ids)
    _write(tmp_path / "weight.bin", table)
    if m:
        _write(tmp_path / "prompt.bin", prompt)
    if lora:
        _write(tmp_path / "a.bin", a)
        _write(tmp_path / "b.bin", b)
    if rows is not None:
        _write(tmp_path / "rows.bin", rows)
    args = (CODE[dtype], batch, seq, m, d, r, d + extra, int(lora), int(rows is not None))
    args += (int(shift), round(scaling * 1e6), int(tasks is not None), max_len)
    args += (n_v, visual.stride(0), visual.stride(1))
    _run(emulator, "forward", tmp_path, *args)
    out = _read(tmp_path / "out.bin", dtype, (batch, m + seq + n_v, d))
    # Visual rows are copies of their source, whatever its strides: bit-exact.
    assert torch.equal(out[:, m + seq :], visual)
    out = out[:, : m + seq]
    ref = REFERENCE.forward(ids, weight, prompt, a, b, rows, scaling, task_ids, order)
    # Prompt rows (and all rows without a delta) are copies: bit-exact.
    assert torch.equal(out[:, :m], ref[:, :m])
    if lora:
        torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
    else:
        assert torch.equal(out, ref)


def _segments(counts: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0, *counts]).cumsum(0)
    order = torch.randperm(int(offsets[-1]), generator=gen)
    return order, offsets


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "counts,d",
    [
        ([3, 1, 5, 2], 40),
        ([0, 2, 0, 0, 70, 1, 0, 40, 3, 0], 40),  # empty segments, segments spanning chunks
        ([130], 37),  # one segment over five chunks, scalar columns
        ([1] * 45 + [0], 16),
    ],
)
def test_segment_sum(emulator, tmp_path, dtype, counts, d):
    gen = torch.Generator().manual_seed(len(counts) + d)
    tokens = sum(counts)
    grad = torch.randn(tokens + 3, d, generator=gen).to(dtype)  # rows beyond the tokens unused
    order, offsets = _segments(counts, gen)
    _write(tmp_path / "grad.bin", grad)
    _write(tmp_path / "src_rows.bin", order)
    _write(tmp_path / "offsets.bin", offsets)
    _run(emulator, "segment_sum", tmp_path, CODE[dtype], tokens, len(counts), d)
    out = _read(tmp_path / "out.bin", torch.float32, (len(counts), d))
    ref = REFERENCE.reduce(grad[:tokens].reshape(1, tokens, d), 0, order, offsets)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "batch,seq,m,d,n_v",
    [(3, 5, 2, 40, 0), (40, 3, 0, 24, 0), (1, 70, 1, 37, 0), (4, 5, 2, 40, 7), (3, 6, 0, 37, 1)],
)
def test_position_sum(emulator, tmp_path, batch, seq, m, d, n_v):
    """The batch sum as bindings.cpp sets it up: segment t holds tokens (b, t), b ascending.
    With visual rows (n_v > 0) grad_out is the view of the text columns, read in place:
    samples are `width` = m + s + n_v rows apart."""
    gen = torch.Generator().manual_seed(batch * seq)
    full = torch.randn(batch, m + seq + n_v, d, generator=gen).to(torch.bfloat16)
    grad = full[:, : m + seq]
    width = full.stride(0) // d
    src = (torch.arange(seq)[:, None] + m + torch.arange(batch)[None, :] * width).reshape(-1)
    _write(tmp_path / "grad.bin", full)
    _write(tmp_path / "src_rows.bin", src)
    _write(tmp_path / "offsets.bin", torch.arange(seq + 1) * batch)
    _run(emulator, "segment_sum", tmp_path, CODE[torch.bfloat16], batch * seq, seq, d)
    out = _read(tmp_path / "out.bin", torch.float32, (seq, d))
    torch.testing.assert_close(out, REFERENCE.reduce(grad, m, None, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("table_dtype", FLOATS)
@pytest.mark.parametrize(
    "tokens,d,inplace,shift",
    [(21, 40, False, 0), (9, 37, True, 0), (18, 64, True, 1), (5, 16, False, 1)],
)
def test_gather_add(emulator, tmp_path, dtype, table_dtype, tokens, d, inplace, shift):
    gen = torch.Generator().manual_seed(tokens * d)
    hidden = torch.randn(1, tokens, d, generator=gen).to(dtype)
    table = torch.randn(7, d, generator=gen).to(table_dtype)
    rows = torch.randint(0, 7, (1, tokens), generator=gen)
    _write(tmp_path / "hidden.bin", hidden)
    _write(tmp_path / "rows.bin", rows)
    _write(tmp_path / "table.bin", table)
    args = (CODE[dtype], CODE[table_dtype], tokens, d, int(inplace), shift)
    _run(emulator, "gather_add", tmp_path, *args)
    out = _read(tmp_path / "out.bin", dtype, (1, tokens, d))
    ref = REFERENCE.gather_add(hidden, rows, table, torch.empty_like(hidden))
    assert torch.equal(out, ref)
