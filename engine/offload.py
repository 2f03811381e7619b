"""Low-memory mode: the DiT's blocks streamed from pinned host memory, one block ahead of the compute.

The 40 blocks of the released DiT hold 34.6 GiB of its 35.2 GiB of bf16 weights (0.865 GiB each); everything else
(patch / text / time embeddings, head, CLIP projection, audio projection) is 0.6 GiB. A 24 GB or 16 GB card
cannot hold the blocks, but it only ever needs one of them at a time. :func:`stream_blocks` rearranges a
loaded DiT so that:

- every parameter outside ``blocks`` lives on the GPU, as before;
- every block's parameters and buffers live at rest in one flat, 256-byte aligned region of PINNED host memory
  (``torch.empty(pin_memory=True)``), so a host-to-device copy of a block is one DMA at full PCIe speed;
- the GPU holds ``prefetch + 1`` reusable flat "slots", each as large as the largest block. Block ``j`` always
  uses slot ``j % (prefetch + 1)``.

A forward of the DiT then runs like this (all of it from module hooks, so ``WanInfiniteTalk.forward`` and the
blocks are untouched and every attribute name / state-dict key stays what the checkpoint calls it):

1. DiT pre-hook: forget what the slots hold (host memory is the truth at the start of every forward, so a
   two-speaker adapter swap written into the host tensors between forwards is never shadowed by a stale slot)
   and start copying block 0 into its slot on a side CUDA stream.
2. Block ``i`` pre-hook: make the compute stream wait for block ``i``'s copy event (``ready``); point each of the
   block's tensors at its view inside the slot (``tensor.data = view``); start copying blocks ``i+1 .. i+prefetch``
   into their slots. Each of those copies first waits (on the side stream) for the ``free`` event of the block that
   used the slot last, so a copy never overwrites weights a queued kernel still reads.
3. Block ``i`` runs while block ``i+1`` is being copied. At 480p a block computes for several times as long as its
   copy takes, so the copies hide behind the compute (the streamed vs resident forward times and the peak memory
   under a capped GPU are in bench/RESULTS.md).
4. Block ``i`` post-hook (``always_call``, so it also runs when the forward raises): record ``free`` on the compute
   stream and point the block's tensors back at their host views. Outside a forward, ``state_dict()``,
   ``named_parameters()`` and in-place writes (``p.data.copy_``) see and change the host copy.
5. DiT post-hook: make the compute stream wait for any copy still in flight, so later work on that stream
   (e.g. a device-to-host write into the host weights) is ordered after every read of the host memory.

Nothing is allocated or freed in the loop (no ``empty_cache``, no ``record_stream``): the slots are allocated once
and the copies only fill them. The hooks are excluded from ``torch.compile`` tracing (``torch.compiler.disable``),
so a block compiled with ``nn.Module.compile`` (engine.fast.compile_blocks) still runs its compiled graph between
the eager hooks; its parameters alternate between two slot addresses, which Dynamo does not guard on. The packing is
dtype-agnostic (a block's tensors are byte ranges of one buffer), so fp8 blocks (engine.fast.enable_fp8: fp8
weights, bf16 biases, fp32 scale buffers) stream as they are, at half the bytes: convert first, then stream.

Pinned host memory comes from torch's caching host allocator, which rounds every request up to a power of two
(pytorch/pytorch#150517). One 0.865 GiB buffer per block would lock 40 GiB of RAM for 34.6 GiB of weights; the
blocks are therefore packed, consecutive and each still contiguous, into a few "arenas" whose sizes fill their
power of two as well as possible (:func:`plan_arenas`: 4 x 8 GiB + 1 x 4 GiB = 36 GiB for the released DiT).

``EngineOptions.memory_mode`` (wired in engine.models_dir.load_models): "low" loads the DiT with its block tensors
sent to host memory one at a time (never the whole DiT on the GPU) and streams them; "auto" picks "low" when the
weights of all networks plus :data:`RESIDENT_HEADROOM_BYTES` exceed the GPU's free memory
(:func:`choose_memory_mode`). VAE tiling is not needed: the 480p decode peaks at 4.6 GiB and the 960x960 one at
9.7 GiB over the loaded models, both inside a 16 GiB cap next to the streamed DiT.

Do not call ``.to()`` / ``.cuda()`` on a streamed DiT: the hooks put the block tensors back on their host views.
Host writes to block weights (``load_state_dict``, adapter swaps) must happen between forwards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from engine.events import emit

__all__ = [
    "ALIGN",
    "RESIDENT_HEADROOM_BYTES",
    "BlockStreamer",
    "choose_memory_mode",
    "plan_arenas",
    "shapes_nbytes",
    "stream_blocks",
]


ALIGN = 256  # byte alignment of every tensor inside a block's region (dtype views need it; DMA prefers it)
ARENA_MAX_BYTES = 16 * 2**30  # largest single pinned allocation planned
# GPU memory kept free beyond the weights when "auto" decides whether everything fits: the 480p DiT forward needs
# ~3.5 GiB of activations over its weights, the bf16 VAE decode ~4.5 GiB (bench/RESULTS.md), plus CUDA context.
RESIDENT_HEADROOM_BYTES = 6 * 2**30


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_arenas(sizes: Sequence[int], *, max_bytes: int = ARENA_MAX_BYTES) -> list[list[int]]:
    """Group consecutive block sizes (bytes) into arenas for a power-of-two rounding allocator.

    Greedy from the first block: among the power-of-two capacities from the block's own rounded size up to
    ``max_bytes``, take the one whose longest prefix of the remaining blocks fills it best (ties: the smaller
    capacity); a block larger than ``max_bytes`` gets an arena of its own. Returns lists of block indices.
    """
    groups: list[list[int]] = []
    i = 0
    while i < len(sizes):
        best: tuple[float, int] = (-1.0, 1)
        cap = _pow2_ceil(max(1, sizes[i]))
        while True:
            used, n = 0, 0
            while i + n < len(sizes) and used + sizes[i + n] <= cap:
                used += sizes[i + n]
                n += 1
            fill = used / cap
            if n and fill > best[0] + 1e-9:
                best = (fill, n)
            cap *= 2
            if cap > max(max_bytes, _pow2_ceil(max(1, sizes[i]))):
                break
        groups.append(list(range(i, i + best[1])))
        i += best[1]
    return groups


def shapes_nbytes(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes of a state dict described by its key -> shape table, every tensor stored as ``dtype``."""
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(s) for s in shapes.values()) * elem


def choose_memory_mode(requested: str, device: torch.device, resident_bytes: int, *,
                       free_bytes: int | None = None, headroom: int = RESIDENT_HEADROOM_BYTES) -> str:
    """Resolve ``EngineOptions.memory_mode`` to "resident" or "low".

    "resident" and "low" are returned as given. "auto" picks "low" only on a CUDA device whose free memory
    (``torch.cuda.mem_get_info``, or ``free_bytes``) is less than the resident set (all networks' weights,
    ``resident_bytes``) plus ``headroom`` for activations; on any other device it is "resident".
    """
    if requested in ("resident", "low"):
        return requested
    if requested != "auto":
        raise ValueError(f"memory_mode must be 'auto', 'resident' or 'low', got {requested!r}")
    if device.type != "cuda":
        return "resident"
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return "resident" if resident_bytes + headroom <= free_bytes else "low"


def _block_tensors(block: nn.Module) -> list[Tensor]:
    """The distinct parameters and buffers of a block (shared tensors once), in registration order."""
    seen: set[int] = set()
    out: list[Tensor] = []
    for t in [*block.parameters(), *block.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _carve(flat: Tensor, offset: int, like: Tensor) -> Tensor:
    """A view of ``like``'s dtype and shape into uint8 ``flat`` at byte ``offset`` (contiguous)."""
    n = like.numel() * like.element_size()
    return flat[offset : offset + n].view(like.dtype).view(like.shape)


class BlockStreamer:
    """Streams ``blocks`` of ``model`` from host memory onto ``device``; built by :func:`stream_blocks`."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device, *, prefetch: int,
                 pin: bool) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if len(blocks) == 0:
            raise ValueError("no blocks to stream")
        self.device = device
        self.prefetch = prefetch
        self.num_slots = prefetch + 1
        self.copies = 0  # block copies issued so far (tests and benchmarks read it)
        self._model = model
        self._blocks = list(blocks)
        self._cuda = device.type == "cuda"
        block_ids = {id(t) for b in self._blocks for t in _block_tensors(b)}
        others = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in block_ids]

        with torch.inference_mode(False), torch.no_grad():
            # Everything outside the blocks: onto the device, once.
            for t in others:
                if t.device != device:
                    t.data = t.data.to(device)
            # Byte layout of every block: tensor k at offsets[k], each ALIGN-aligned.
            self._tensors = [_block_tensors(b) for b in self._blocks]
            layouts: list[list[int]] = []
            sizes: list[int] = []
            for ts in self._tensors:
                offs, pos = [], 0
                for t in ts:
                    offs.append(pos)
                    pos = _round_up(pos + t.numel() * t.element_size(), ALIGN)
                layouts.append(offs)
                sizes.append(max(pos, ALIGN))
            self.block_bytes = sizes

            self.pinned = pin
            moved_from_cuda = self._pack_host(sizes, layouts)

            # Device slots and, per block, the views of its tensors inside its slot.
            self.slot_bytes = max(sizes)
            self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=device)
                           for _ in range(self.num_slots)]
            self._dev_flat = [self._slots[j % self.num_slots][: sizes[j]] for j in range(len(sizes))]
            self._dev = [[_carve(self._dev_flat[j], off, t) for t, off in zip(ts, layouts[j])]
                         for j, ts in enumerate(self._tensors)]
        if moved_from_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # once, at setup: give the blocks' old GPU memory back

        self._owner: list[int | None] = [None] * self.num_slots  # block held (or being copied) per slot
        self._active: int | None = None
        self._in_forward = False
        if self._cuda:
            self._side = torch.cuda.Stream(device=device)
            self._ready = [torch.cuda.Event() for _ in range(self.num_slots)]
            self._free = [torch.cuda.Event() for _ in range(self.num_slots)]
            self._free_recorded = [False] * self.num_slots
        self._handles = [
            model.register_forward_pre_hook(self._model_pre),
            model.register_forward_hook(self._model_post, always_call=True),
        ]
        for i, b in enumerate(self._blocks):
            self._handles.append(b.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(b.register_forward_hook(self._make_post(i), always_call=True))

    # ------------------------------------------------------------------ setup helpers
    def _pack_host(self, sizes: list[int], layouts: list[list[int]]) -> bool:
        """Host arenas (pinned when asked and possible), then each block packed into its region and its tensors
        pointed at their host views. Returns True when some block tensor came from a CUDA device."""
        moved_from_cuda = False
        self._arenas: list[Tensor] = []
        self._host_flat: list[Tensor] = [torch.empty(0)] * len(sizes)
        for group in plan_arenas(sizes):
            arena = self._host_alloc(sum(sizes[j] for j in group))
            self._arenas.append(arena)
            pos = 0
            for j in group:
                self._host_flat[j] = arena[pos : pos + sizes[j]]
                pos += sizes[j]
        self._host: list[list[Tensor]] = []
        for j, ts in enumerate(self._tensors):
            views = []
            for t, off in zip(ts, layouts[j]):
                v = _carve(self._host_flat[j], off, t)
                moved_from_cuda |= t.is_cuda
                v.copy_(t.data)
                t.data = v  # the old storage (CPU or GPU) is released here
                views.append(v)
            self._host.append(views)
        return moved_from_cuda

    def _host_alloc(self, nbytes: int) -> Tensor:
        if self.pinned:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as e:  # e.g. a container or WSL limit on locked memory
                emit("engine.pin_memory_failed", logging.WARNING, gib=round(nbytes / 2**30, 3),
                     error=str(e).splitlines()[0], note="streaming from pageable memory, slower")
                self.pinned = False
        return torch.empty(nbytes, dtype=torch.uint8)

    @property
    def host_bytes(self) -> int:
        """Host bytes requested for the blocks (a pinned allocation may round each arena up to a power of two)."""
        return sum(a.numel() for a in self._arenas)

    @property
    def device_bytes(self) -> int:
        """GPU bytes of the slots."""
        return self.slot_bytes * self.num_slots

    # ------------------------------------------------------------------ copies
    def _issue(self, j: int) -> None:
        """Start copying block j into its slot (no-op if the slot already holds or is receiving it)."""
        s = j % self.num_slots
        if self._owner[s] == j:
            return
        if self._cuda:
            if self._free_recorded[s]:
                self._side.wait_event(self._free[s])  # the last reader of this slot is done with it
            with torch.cuda.stream(self._side):
                self._dev_flat[j].copy_(self._host_flat[j], non_blocking=True)
                self._ready[s].record(self._side)
        else:
            self._dev_flat[j].copy_(self._host_flat[j])
        self._owner[s] = j
        self.copies += 1

    def _check_unchanged(self, i: int, block: nn.Module) -> None:
        """Raise if block i's tensors are no longer the ones packed (a layer swapped in after streaming, e.g.
        engine.fast.enable_fp8: its new weights would sit unstreamed in host memory). ~30 id lookups per call."""
        packed = self._tensors[i]
        now = _block_tensors(block)
        if len(now) != len(packed) or any(a is not b for a, b in zip(now, packed)):
            raise RuntimeError(f"block {i}'s parameters changed after stream_blocks (layers replaced?); convert the "
                               "blocks first (e.g. engine.fast.enable_fp8), then call stream_blocks")

    def _attach(self, i: int) -> None:
        for t, v in zip(self._tensors[i], self._dev[i]):
            t.data = v

    def _detach(self, i: int) -> None:
        for t, v in zip(self._tensors[i], self._host[i]):
            t.data = v

    # ------------------------------------------------------------------ hooks (eager even inside torch.compile)
    @torch.compiler.disable
    def _model_pre(self, module: nn.Module, args: Any) -> None:
        self._owner = [None] * self.num_slots
        self._in_forward = True
        self._issue(0)

    @torch.compiler.disable
    def _model_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._in_forward = False
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            for s, owner in enumerate(self._owner):
                if owner is not None:
                    compute.wait_event(self._ready[s])

    def _make_pre(self, i: int) -> Any:
        @torch.compiler.disable
        def pre(module: nn.Module, args: Any) -> None:
            self._check_unchanged(i, module)
            if self._active is not None:  # a block left attached by an aborted call
                self._detach(self._active)
                self._active = None
            self._issue(i)
            s = i % self.num_slots
            if self._cuda:
                torch.cuda.current_stream(self.device).wait_event(self._ready[s])
            self._attach(i)
            self._active = i
            if self._in_forward:
                for j in range(i + 1, min(i + 1 + self.prefetch, len(self._blocks))):
                    self._issue(j)

        return pre

    def _make_post(self, i: int) -> Any:
        @torch.compiler.disable
        def post(module: nn.Module, args: Any, output: Any) -> None:
            s = i % self.num_slots
            if self._cuda:
                self._free[s].record(torch.cuda.current_stream(self.device))
                self._free_recorded[s] = True
            self._detach(i)
            self._active = None
            if not self._in_forward:
                self._owner[s] = None  # a block called on its own re-reads host memory next time

        return post

    # ------------------------------------------------------------------ teardown
    def remove(self) -> None:
        """Remove the hooks and free the device slots. The block tensors stay on their host views (pinned memory):
        ``model.to(device)`` afterwards makes the model resident again."""
        if self._cuda:
            self._side.synchronize()
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._active is not None:
            self._detach(self._active)
            self._active = None
        self._slots, self._dev_flat, self._dev = [], [], []
        if getattr(self._model, "_block_streamer", None) is self:
            object.__setattr__(self._model, "_block_streamer", None)


def stream_blocks(model: nn.Module, device: torch.device | str, *, prefetch: int = 1, pin: bool | None = None,
                  blocks: nn.ModuleList | None = None) -> BlockStreamer:
    """Make ``model`` run with its ``blocks`` streamed from host memory onto ``device`` (see the module docstring).

    ``model``'s other parameters and buffers are moved to ``device``; each block's tensors are packed into host
    memory, pinned when ``pin`` (default: when ``device`` is a CUDA device), and copied into one of ``prefetch + 1``
    device slots ``prefetch`` blocks ahead of the compute. The blocks may sit on any device when this is called
    (CPU after a low-memory load, or the GPU, whose copies are then released). ``blocks`` defaults to
    ``model.blocks`` and must be run in order, each once per forward of ``model``. On a CPU ``device`` the same
    packing, copies and hooks run synchronously (a numerical identity; the tests use it).

    The returned streamer is also kept as ``model._block_streamer``; streaming a model twice raises ValueError.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if getattr(model, "_block_streamer", None) is not None:
        raise ValueError("this model's blocks are already streamed; call ._block_streamer.remove() first")
    blk = blocks if blocks is not None else model.blocks
    if not isinstance(blk, nn.ModuleList):
        raise TypeError(f"blocks must be an nn.ModuleList, got {type(blk).__name__}")
    streamer = BlockStreamer(model, blk, device, prefetch=prefetch,
                             pin=(device.type == "cuda") if pin is None else pin)
    object.__setattr__(model, "_block_streamer", streamer)  # plain attribute: not a submodule, not in the state dict
    return streamer
