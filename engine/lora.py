"""LoRA files: which target weights they change, and merging them into a stream of dequantised weights.

Split from engine/weights.py (which reads and loads safetensors files); docs/formats.md §10 has the key forms
and the merge formula: ``W' = W + s * (alpha / r if alpha else 1) * (up @ down)``, ``b' = b + s * diff_b``,
``W' = W + s * diff``, computed in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from engine.weights import DTypeSpec, FileInfo, WeightsError, _check_unchanged, _dtype_for, _fmt_keys

__all__ = ["LoraReport", "LoraDelta", "LoraPlan", "lora_deltas", "merge_lora"]


# suffix -> role. kijai/lightx2v use lora_down/lora_up; peft uses lora_A/lora_B (optionally ".default").
# fmt: off
_LORA_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_A", "down"), (".lora_B", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
)
# fmt: on
_LORA_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_LORA_UNET = "lora_unet_"


@dataclass(frozen=True)
class LoraReport:
    """``applied``: target tensors that receive a delta; ``skipped_inert``: known no-effect keys (lightx2v's
    ``diff_m``, which ComfyUI does not load either); ``unknown``: LoRA keys this loader does not understand —
    the engine logs them by name (they are not merged)."""

    applied: int
    skipped_inert: list[str]
    unknown: list[str]


@dataclass(frozen=True)
class LoraDelta:
    """The LoRA tensors (raw keys in the LoRA file) that change one target tensor."""

    pairs: tuple[tuple[str, str, str | None], ...] = ()  # (up, down, alpha or None)
    diffs: tuple[str, ...] = ()  # full deltas (.diff / .diff_b), target-shaped


@dataclass(frozen=True)
class LoraPlan:
    """Which target keys a LoRA file changes, and how; built from the header only."""

    deltas: dict[str, LoraDelta]
    report: LoraReport


def _group_keys(lora: FileInfo, targets: set[str]) -> tuple[dict[str, dict[str, str]], list[str], list[str],
                                                            list[str]]:
    """A LoRA file's raw keys grouped per target module and role (up/down/alpha/diff/diff_b), plus the keys known to
    be inert, the keys not understood and the problems found (module -> role -> raw key, inert, unknown, errors)."""
    # underscore module name -> dotted module names (for lora_unet_), built from the targets
    under: dict[str, set[str]] = {}
    for t in targets:
        for mod in (t, t.rsplit(".", 1)[0] if t.endswith((".weight", ".bias")) else t):
            under.setdefault(mod.replace(".", "_"), set()).add(mod)

    groups: dict[str, dict[str, str]] = {}  # module -> role -> raw key
    inert: list[str] = []
    unknown: list[str] = []
    errors: list[str] = []
    for rawk in lora.tensors:
        name = rawk
        for p in _LORA_PREFIXES:
            if name.startswith(p):
                name = name[len(p) :]
                break
        if name == "diff_m" or name.endswith(".diff_m"):
            inert.append(rawk)
            continue
        match = next(((role, suffix) for suffix, role in _LORA_SUFFIXES if name.endswith(suffix)), None)
        if match is None:
            unknown.append(rawk)
            continue
        role, suffix = match
        module = name[: -len(suffix)]
        if module.startswith(_LORA_UNET):
            found = under.get(module[len(_LORA_UNET) :], set())
            if len(found) != 1:
                why = "matches no target" if not found else f"is ambiguous ({', '.join(sorted(found))})"
                errors.append(f"{rawk} {why}")
                continue
            module = next(iter(found))
        groups.setdefault(module, {})[role] = rawk

    return groups, inert, unknown, errors


def lora_deltas(lora: FileInfo, target_keys: Collection[str] | Mapping[str, tuple[int, ...]]) -> LoraPlan:
    """Parse a LoRA file's keys into a per-target plan (reads the header only).

    Accepted names: ``[model.]diffusion_model.<module>`` or bare ``<module>`` with ``.lora_down.weight`` /
    ``.lora_up.weight`` (+ ``.alpha``), ``.lora_A[.default].weight`` / ``.lora_B[.default].weight``,
    ``.diff`` (full delta of ``<module>.weight``, or of ``<module>`` itself for a bare parameter such as
    ``modulation``) and ``.diff_b`` (delta of ``<module>.bias``); and kohya's ``lora_unet_<module with
    underscores>``, mapped back to dotted names through ``target_keys``. ``diff_m`` is known-inert.
    A target missing from ``target_keys``, an ambiguous underscore name, an incomplete up/down pair or (when
    ``target_keys`` maps keys to shapes) a shape mismatch raises :class:`WeightsError` naming the LoRA file.
    """
    path = lora.path
    shapes = dict(target_keys) if isinstance(target_keys, Mapping) else None
    targets = set(target_keys)
    groups, inert, unknown, errors = _group_keys(lora, targets)
    deltas: dict[str, LoraDelta] = {}

    def add(target: str, rawk: str, pair: tuple[str, str, str | None] | None = None) -> None:
        d = deltas.get(target, LoraDelta())
        deltas[target] = LoraDelta(d.pairs + (pair,), d.diffs) if pair else LoraDelta(d.pairs, d.diffs + (rawk,))

    def check_shape(rawk: str, target: str, got: tuple[int, ...]) -> None:
        if shapes is not None and math.prod(got) != math.prod(shapes[target]):
            errors.append(f"{rawk} gives a delta of shape {list(got)} for {target} {list(shapes[target])}")

    for module, roles in groups.items():
        if "up" in roles or "down" in roles:
            if "up" not in roles or "down" not in roles:
                errors.append(f"{module}: has only {'lora_up' if 'up' in roles else 'lora_down'} of a pair")
            elif (target := module + ".weight") not in targets:
                errors.append(f"{roles['up']} targets {target}, which the network does not have")
            else:
                up, down = lora.tensors[roles["up"]].shape, lora.tensors[roles["down"]].shape
                if len(up) < 2 or len(down) < 2 or up[1] != down[0]:
                    errors.append(f"{roles['up']} {list(up)} and {roles['down']} {list(down)} do not pair")
                else:
                    check_shape(roles["up"], target, (up[0], math.prod(down[1:])))
                    if shapes is not None and shapes[target][0] != up[0]:
                        errors.append(f"{roles['up']} has {up[0]} rows but {target} has {shapes[target][0]}")
                    add(target, roles["up"], (roles["up"], roles["down"], roles.get("alpha")))
        elif "alpha" in roles:
            unknown.append(roles["alpha"])  # an alpha without a pair changes nothing
        if "diff" in roles:
            cands = [module + ".weight", module]
            target = next((c for c in cands if c in targets), "")
            if not target:
                errors.append(f"{roles['diff']} targets {module}.weight, which the network does not have")
            else:
                check_shape(roles["diff"], target, lora.tensors[roles["diff"]].shape)
                add(target, roles["diff"])
        if "diff_b" in roles:
            if (target := module + ".bias") not in targets:
                errors.append(f"{roles['diff_b']} targets {target}, which the network does not have")
            else:
                check_shape(roles["diff_b"], target, lora.tensors[roles["diff_b"]].shape)
                add(target, roles["diff_b"])
    if errors:
        raise WeightsError(
            f"{path}: LoRA does not fit this network ({len(errors)} problems: {_fmt_keys(errors)}). "
            "Check that the LoRA was trained for this model (Wan 2.1 I2V 14B)."
        )
    return LoraPlan(deltas, LoraReport(applied=len(deltas), skipped_inert=inert, unknown=unknown))


def merge_lora(
    tensors: Iterable[tuple[str, Tensor]],
    lora: FileInfo,
    strength: float,
    target_keys: Collection[str] | Mapping[str, tuple[int, ...]],
    *,
    out_dtype: DTypeSpec | None = None,
    plan: LoraPlan | None = None,
) -> tuple[Iterator[tuple[str, Tensor]], LoraReport]:
    """Merge a LoRA into a ``(key, tensor)`` stream; returns the new stream and the report (known up front).

    For each target: ``W' = W + s * (alpha / r if alpha else 1) * (up @ down)`` (flattened to W's shape),
    ``W' = W + s * diff``, ``b' = b + s * diff_b``, computed in fp32 on W's device and cast to ``out_dtype``
    (default: W's dtype) — pass dequantised weights (iter_tensors does that), ideally already fp32. The
    LoRA's tensors for a key are read only when that key streams by. A planned target that never streams
    by is an error at the end of the stream. ``plan`` reuses a :func:`lora_deltas` result.
    """
    plan = plan if plan is not None else lora_deltas(lora, target_keys)
    return _merge(tensors, lora, strength, plan, out_dtype), plan.report


def _merge(
    tensors: Iterable[tuple[str, Tensor]],
    lora: FileInfo,
    strength: float,
    plan: LoraPlan,
    out_dtype: DTypeSpec | None,
) -> Iterator[tuple[str, Tensor]]:
    seen: set[str] = set()
    with ExitStack() as stack:
        handle: Any = None  # the LoRA file is opened when its first target streams by
        for key, t in tensors:
            delta = plan.deltas.get(key)
            if delta is None:
                yield key, t
                continue
            if handle is None:
                _check_unchanged(lora)
                handle = stack.enter_context(safe_open(str(lora.path), framework="pt", device="cpu"))
            seen.add(key)
            w = t.float()
            for up_k, down_k, alpha_k in delta.pairs:
                up = handle.get_tensor(up_k).to(device=w.device, dtype=torch.float32).flatten(1)  # [out, r]
                down = handle.get_tensor(down_k).to(device=w.device, dtype=torch.float32).flatten(1)  # [r, in...]
                scale = 1.0
                if alpha_k is not None:  # alpha / rank, rank = rows of down (ComfyUI's convention)
                    scale = float(handle.get_tensor(alpha_k).float().reshape(-1)[0]) / down.shape[0]
                upd = up @ down  # [out, prod(in...)]
                if upd.numel() != w.numel():
                    raise WeightsError(f"{lora.path}: {up_k} @ {down_k} does not fit {key} {list(w.shape)}.")
                w = w + (strength * scale) * upd.reshape(w.shape)
            for diff_k in delta.diffs:
                d = handle.get_tensor(diff_k).to(device=w.device, dtype=torch.float32)
                if d.numel() != w.numel():
                    raise WeightsError(f"{lora.path}: {diff_k} {list(d.shape)} does not fit {key} {list(w.shape)}.")
                w = w + strength * d.reshape(w.shape)
            yield key, w.to(t.dtype if out_dtype is None else _dtype_for(out_dtype, key))
    missing = sorted(set(plan.deltas) - seen)
    if missing:
        raise WeightsError(f"{lora.path}: LoRA targets never appeared in the weight stream: {_fmt_keys(missing)}.")
