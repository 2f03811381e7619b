"""The ComfyUI ``models/`` folder: where each file lives, checking it (``doctor``), loading it.

Every network is read the same way (weights.py): the header first (format, prefix, dtype), the
network config from the tensor shapes, the module built on the meta device, then tensors streamed
one at a time onto the target device and assigned strictly. No rename tables beyond prefix
stripping and each encoder's ``normalize_keys`` for spelling variants of the same tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from engine import lora as lora_mod
from engine import weights as wt
from engine.api import EngineOptions
from engine.events import emit
from engine.models import Models
from engine.recipes import PRESETS

if TYPE_CHECKING:
    from engine.dit import WanInfiniteTalk
    from engine.text_encoder import Tokenizer



@dataclass(frozen=True)
class Role:
    name: str
    folders: tuple[str, ...]  # the ComfyUI folder first, then the aliases older layouts use
    default: str
    what: str
    need: str  # "always" | "patch" (at least one of the two) | "lora" (when the preset uses it) | "optional"


ROLES: tuple[Role, ...] = (
    Role("dit", ("diffusion_models", "unet"), "Wan2_1-I2V-14B-480p_fp8_e4m3fn_scaled_KJ.safetensors",
         "Wan 2.1 I2V 14B 480p DiT", "always"),
    Role("patch_single", ("model_patches", "diffusion_models"), "wan2.1_infiniteTalk_single_fp16.safetensors",
         "InfiniteTalk single-speaker adapter", "patch"),
    Role("patch_multi", ("model_patches", "diffusion_models"), "wan2.1_infiniteTalk_multi_fp16.safetensors",
         "InfiniteTalk two-speaker adapter", "patch"),
    Role("text_encoder", ("text_encoders", "clip"), "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
         "umT5-XXL text encoder", "always"),
    Role("audio_encoder", ("audio_encoders", "wav2vec2"), "wav2vec2-chinese-base_fp16.safetensors",
         "chinese-wav2vec2-base audio encoder", "always"),
    Role("vae", ("vae",), "Wan2_1_VAE_bf16.safetensors", "Wan 2.1 VAE", "always"),
    Role("lora", ("loras",), "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors",
         "lightx2v step-distill LoRA", "lora"),
    Role("clip_vision", ("clip_vision",), "clip_vision_h.safetensors", "CLIP ViT-H/14 vision tower", "optional"),
)
ROLE_BY_NAME = {r.name: r for r in ROLES}


def _is_adapter_key(key: str) -> bool:
    return key.startswith("audio_proj.") or ".norm_x." in key or ".audio_cross_attn." in key


def locate(models_dir: Path, files: Mapping[str, str] | None = None) -> dict[str, Path | None]:
    """The path of each role's file, or None. A symlink into a shared store is fine if it ends at a file."""
    files = files or {}
    found: dict[str, Path | None] = {}
    for role in ROLES:
        name = files.get(role.name, role.default)
        found[role.name] = None
        for folder in role.folders:
            p = models_dir / folder / name
            if p.is_file():  # follows symlinks; a dangling link is not a file
                found[role.name] = p
                break
    return found


def _network(role: str) -> ModuleType:
    """The network file that defines the tensors of a role (imported lazily: they pull in transformers)."""
    import importlib

    module = {"dit": "dit", "patch_single": "dit", "patch_multi": "dit", "vae": "vae",
              "text_encoder": "text_encoder", "audio_encoder": "audio", "clip_vision": "image_encoder"}[role]
    return importlib.import_module(f"engine.{module}")


def _expected_shapes(net: ModuleType, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The key -> shape table of the network a file's shapes describe (built on the meta device)."""
    module = net.build(net.config_from_shapes(shapes), "meta")
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _normalize(net: ModuleType, d: dict[str, Any]) -> dict[str, Any]:
    fn = getattr(net, "normalize_keys", None)
    return fn(d) if fn is not None else d


def _compare(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]]) -> list[str]:
    problems = []
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    bad = [k for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
    if extra:
        problems.append(f"{len(extra)} unexpected keys, e.g. {', '.join(extra[:3])}")
    if bad:
        k = bad[0]
        problems.append(f"{len(bad)} mis-shaped keys, e.g. {k} {list(got[k])} (expected {list(expected[k])})")
    return problems


def _check_file(role: str, info: wt.FileInfo, others: Mapping[str, wt.FileInfo]) -> tuple[str, list[str]]:
    """(summary, problems) of one file's keys against the network it should hold."""
    shapes = wt.logical_shapes(info)
    try:
        if role in ("dit", "patch_single", "patch_multi"):
            net = _network("dit")
            base = shapes if role == "dit" else (wt.logical_shapes(others["dit"]) if "dit" in others else None)
            patch = shapes if role != "dit" else next(
                (wt.logical_shapes(others[r]) for r in ("patch_single", "patch_multi") if r in others), None)
            if base is None or patch is None:
                # Without the partner file the config cannot be read from shapes alone; check the side we have.
                own = [k for k in shapes if _is_adapter_key(k) == (role == "dit")]
                return (f"{len(shapes)} tensors", [f"keys of the wrong kind, e.g. {own[0]}"] if own else [])
            expected = _expected_shapes(net, {**base, **patch})
            want = {k: v for k, v in expected.items() if _is_adapter_key(k) == (role != "dit")}
            return f"{len(shapes)} tensors", _compare(want, shapes)
        if role == "lora":
            return f"{len(shapes)} tensors", []  # checked against the DiT keys when merged at load
        net = _network(role)
        got = _normalize(net, dict(shapes))
        return f"{len(shapes)} tensors", _compare(_expected_shapes(net, got), got)
    except (ValueError, KeyError) as e:
        return f"{len(shapes)} tensors", [f"not a {ROLE_BY_NAME[role].what} file: {e}"]


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def doctor(
    models_dir: Path, files: Mapping[str, str] | None = None, *, need_lora: bool = True
) -> tuple[bool, list[str]]:
    """Check every expected file: one human line each. ok is False when something needed is missing or wrong."""
    files = files or {}
    lines: list[str] = []
    ok = True
    if not models_dir.is_dir():  # still list every expected file below, so the user sees what goes where
        ok = False
        lines.append(f"models folder {models_dir} does not exist; point engine.models_dir (or --models-dir) at "
                     "your ComfyUI models/ folder")
    paths = locate(models_dir, files)
    infos: dict[str, wt.FileInfo] = {}
    errors: dict[str, str] = {}
    for role, path in paths.items():
        if path is None:
            continue
        try:
            infos[role] = wt.read_header(path)
        except wt.WeightsError as e:
            errors[role] = str(e)
    for role in ROLES:
        name = files.get(role.name, role.default)
        path = paths[role.name]
        needed = role.need == "always" or (role.need == "lora" and need_lora)
        if path is None:
            where = f"{models_dir}/{role.folders[0]}/{name}"
            extra = ""
            if role.need == "patch":
                state, extra = "missing", "; optional if the other patch is present"
            elif needed:
                state = "MISSING"
                ok = False
            else:
                state, extra = "absent", "; optional"
            if role.name == "clip_vision":
                extra += ": renders run without CLIP features, as ComfyUI native does"
            lines.append(f"{state:<8} {role.name:<13} {where}  ({role.what}){extra}")
            continue
        if role.name in errors:
            ok = False
            lines.append(f"BAD      {role.name:<13} {path}: {errors[role.name]}")
            continue
        info = infos[role.name]
        summary, problems = _check_file(role.name, info, infos)
        fmt = "fp8-scaled" if info.quant in ("scaled_fp8", "comfy_quant") else info.quant
        desc = (f"{info.main_dtype} {fmt} prefix={info.prefix or '-'} {summary} {_human_size(info.size)}")
        if problems:
            ok = False
            lines.append(f"BAD      {role.name:<13} {path}: {desc}; " + "; ".join(problems))
        else:
            lines.append(f"ok       {role.name:<13} {path}: {desc}, keys ok")
    tok_ok, tok_line = tokenizer_line(infos.get("text_encoder"), files)
    ok = ok and tok_ok
    lines.append(tok_line)
    if paths["patch_single"] is None and paths["patch_multi"] is None:
        ok = False
        lines.append("MISSING  an InfiniteTalk patch: put wan2.1_infiniteTalk_single_fp16.safetensors (one speaker) "
                     f"and/or the multi file in {models_dir}/model_patches/")
    return ok, lines


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise wt.WeightsError(f"engine.device is {device!r} but no CUDA device is visible to torch; "
                                  "check the driver (nvidia-smi) or set device: cpu")
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    return dev, dt


def load_single(info: wt.FileInfo, role: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A network of one file (the VAE, umT5, wav2vec2, CLIP): config from the header's shapes, built on meta,
    streamed, loaded strictly (weights.load_network), in eval mode."""
    net = _network(role)
    module, _ = wt.load_network(info, config_from_shapes=net.config_from_shapes, build=net.build,
                                normalize_keys=getattr(net, "normalize_keys", None), dtype=dtype, device=device)
    return module.eval()


def load_dit(base: wt.FileInfo, patch: wt.FileInfo, *, device: torch.device, dtype: torch.dtype,
             lora: wt.FileInfo | None = None, lora_strength: float = 1.0, memory_mode: str = "resident",
             fp8_targets: Sequence[str] = (),
             ) -> tuple[torch.nn.Module, lora_mod.LoraReport | None]:
    """Base DiT + InfiniteTalk patch (+ LoRA merged into the dequantised weights), strict, streamed.

    ``memory_mode="low"``: tensors are still dequantised (and LoRA-merged) one at a time on ``device``, but every
    ``blocks.*`` tensor is moved to host memory as soon as it is ready, so the whole DiT is never on the GPU;
    then engine.offload.stream_blocks packs the blocks into pinned memory and streams them during forwards.
    ``fp8_targets`` (engine.fast.FP8_TARGETS or a subset): those Linears of every block become fp8
    (engine.fast.enable_fp8, fast accumulation), one block at a time on ``device`` (in low mode before packing,
    so the pinned host memory and every block copy are about half the bf16 size). See :func:`_to_fp8`.
    """
    net = _network("dit")
    base_shapes, patch_shapes = wt.logical_shapes(base), wt.logical_shapes(patch)
    overlap = sorted(set(base_shapes) & set(patch_shapes))
    if overlap:
        raise wt.WeightsError(f"{patch.path}: {len(overlap)} keys are also in {base.path} (e.g. {overlap[0]}); the "
                              "InfiniteTalk patch must hold only the adapter. Is the right file in model_patches/?")
    shapes = {**base_shapes, **patch_shapes}
    cfg = net.config_from_shapes(shapes)
    dit = net.build(cfg, device)
    report = None
    if lora is None:
        stream: Iterable[tuple[str, torch.Tensor]] = wt.iter_tensors(base, dtype=dtype, device=device)
    else:
        # LoRA targets are read in fp32 and rounded once, after the merge (docs/formats.md §10.2).
        plan = lora_mod.lora_deltas(lora, {k: tuple(v.shape) for k, v in dit.state_dict().items()})
        targets = set(plan.deltas)
        stream = wt.iter_tensors(base, dtype=lambda k: torch.float32 if k in targets else dtype, device=device)
        stream, report = lora_mod.merge_lora(stream, lora, lora_strength, set(plan.deltas), out_dtype=dtype, plan=plan)
    tensors: Iterable[tuple[str, torch.Tensor]] = chain(stream, wt.iter_tensors(patch, dtype=dtype, device=device))
    if memory_mode == "low":
        host = torch.device("cpu")
        tensors = ((k, t.to(host) if k.startswith("blocks.") else t) for k, t in tensors)
    wt.load_module(dit, tensors, source=f"{base.path} + {patch.path}")
    if fp8_targets:
        _to_fp8(dit, fp8_targets, device, stored=base if lora is None else None, on_host=memory_mode == "low")
    if memory_mode == "low":
        from engine.offload import stream_blocks

        streamer = stream_blocks(dit, device)
        emit("engine.blocks_streamed", host_memory="pinned" if streamer.pinned else "pageable",
             host_gib=round(streamer.host_bytes / 2**30, 3), slots=streamer.num_slots,
             slot_gib=round(streamer.slot_bytes / 2**30, 3), device=str(device))
    return dit.eval(), report


def _to_fp8(dit: torch.nn.Module, targets: Sequence[str], device: torch.device, *, stored: wt.FileInfo | None,
            on_host: bool) -> None:
    """Turn the ``targets`` Linears of every DiT block into fp8 (fast accumulation), one block at a time on ``device``
    (blocks kept ``on_host`` are moved there and back).

    Where ``stored`` (the base DiT file, given only when no LoRA was merged) holds a layer's weight as F8_E4M3 with a
    per-tensor or per-row scale — the ComfyUI fp8-scaled files — that payload is used as is: the fp8 GEMM then sees
    exactly the file's weight and the only rounding the fp8 path adds is the activations'. Any other weight (a
    bf16 file, a LoRA-merged one, the InfiniteTalk adapter from its fp16 patch) is quantised per output channel,
    a second rounding of an fp8 file's values (bench/bench_fp8_source.py measures the difference).
    """
    from engine.fast import enable_fp8

    converted = exact = 0
    for i, block in enumerate(dit.blocks):  # type: ignore[arg-type]
        if on_host:
            block.to(device)
        holder = torch.nn.Module()
        holder.blocks = torch.nn.ModuleList([block])
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if stored is not None:  # the file's key -> the layer's name inside the one-block holder
            names = {f"blocks.{i}.{rel}.weight": f"blocks.0.{rel}" for rel in targets}
            weights = {names[key]: payload for key, payload in wt.iter_fp8_weights(stored, names, device=device)}
        # Fast accumulation: faster at the same error as fp32 promotion (bench/RESULTS.md, fp8 accumulation).
        converted += enable_fp8(holder, targets=targets, fast_accum=True, weights_fp8=weights)
        exact += len(weights)
        if on_host:
            block.to("cpu")
    emit("engine.fp8_layers", layers=converted, streamed=on_host, from_file=exact, quantised=converted - exact)


def patch_swapper(dit: torch.nn.Module, patches: Mapping[int, wt.FileInfo], current: int,
                  device: torch.device, dtype: torch.dtype) -> Callable[[int], None]:
    """A callable that loads the adapter weights for 1 or 2 speakers into the resident DiT when they change."""
    state = {"speakers": current}

    def swap(speakers: int) -> None:
        want = patches.get(speakers) or next(iter(patches.values()))
        have = patches.get(state["speakers"]) or next(iter(patches.values()))
        if want.path == have.path:
            return
        params = dict(dit.named_parameters())
        for key, t in wt.iter_tensors(want, dtype=dtype, device=device):
            params[key].data.copy_(t)
        state["speakers"] = speakers

    return swap


def iter_roles(found: Mapping[str, Path | None]) -> Iterator[tuple[str, Path]]:
    for k, v in found.items():
        if v is not None:
            yield k, v


def load_models(options: EngineOptions) -> Models:
    """Load every network for ``options`` onto its device. Raises WeightsError naming the file when one is
    missing, damaged or of the wrong network."""
    dev, dt = resolve_device(options.device, options.dtype)
    need_lora = PRESETS[options.preset].use_lora if options.preset in PRESETS else False
    ok, lines = doctor(options.models_dir, options.files, need_lora=need_lora)
    if not ok:
        bad = [ln for ln in lines if not ln.startswith(("ok", "absent", "missing"))]
        raise wt.WeightsError("the models folder is not complete:\n  " + "\n  ".join(bad)
                              + "\nrun 'infinitetalkd doctor --models-dir DIR' for the full list")
    found = locate(options.models_dir, options.files)
    infos = {role: wt.read_header(path) for role, path in iter_roles(found)}
    patches = {n: infos[r] for n, r in ((1, "patch_single"), (2, "patch_multi")) if r in infos}
    first = 1 if 1 in patches else 2
    lora = infos.get("lora") if need_lora else None
    mode = _memory_mode(options.memory_mode, infos, patches[first], dev, dt)

    dit = _load_dit_for(options, infos, patches, first, lora, dev, dt, mode)
    vae = load_single(infos["vae"], "vae", dev, dt)
    # umT5 runs once per new prompt; in low-memory mode it waits on the CPU between prompts.
    text_dev = torch.device("cpu") if mode == "low" else dev
    text_dt = dt if text_dev.type == "cuda" else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    text_encoder = load_single(infos["text_encoder"], "text_encoder", text_dev, text_dt)
    tokenizer, tokenizer_source = load_tokenizer(infos["text_encoder"], options.files)
    # wav2vec2 is small and its features feed every frame: fp32, as the official code runs it.
    audio_encoder = load_single(infos["audio_encoder"], "audio_encoder", dev, torch.float32)
    clip = None
    if "clip_vision" in infos:
        clip = load_single(infos["clip_vision"], "clip_vision", dev, dt)
    else:
        emit("engine.clip_absent", note="rendering without CLIP image features, as ComfyUI native does")
    return Models(
        dit=dit, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, audio_encoder=audio_encoder, clip=clip,
        device=dev, dtype=dt, identities={r: wt.file_identity(p) for r, p in iter_roles(found)
                                          if r != "lora" or lora is not None},
        text_device=text_dev, speakers_supported=(1, 2),
        lora_strength=options.lora_strength if lora is not None else None,
        swap_patch=patch_swapper(dit, patches, first, dev, dt) if len(patches) == 2 else None,
        tokenizer_source=tokenizer_source,
    )


def _memory_mode(setting: str, infos: Mapping[str, wt.FileInfo], patch: wt.FileInfo, dev: torch.device,
                 dt: torch.dtype) -> str:
    """"resident" or "low". "auto" streams the DiT blocks (and parks umT5 on the CPU) only when the weights of every
    network in the load dtype (wav2vec2 in fp32), plus activation headroom, exceed the device's free memory.
    "low" is honoured on any device (on the CPU it changes nothing but exercises the streaming path)."""
    from engine.offload import RESIDENT_HEADROOM_BYTES, choose_memory_mode, shapes_nbytes

    resident = shapes_nbytes({**wt.logical_shapes(infos["dit"]), **wt.logical_shapes(patch)}, dt)
    resident += sum(shapes_nbytes(wt.logical_shapes(infos[r]), dt) for r in ("vae", "text_encoder", "clip_vision")
                    if r in infos)
    resident += shapes_nbytes(wt.logical_shapes(infos["audio_encoder"]), torch.float32)
    mode = choose_memory_mode(setting, dev, resident)
    if setting == "auto":
        free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 0
        emit("engine.memory_mode", mode=mode, weights_gib=round(resident / 2**30, 2),
             headroom_gib=round(RESIDENT_HEADROOM_BYTES / 2**30, 2), free_gib=round(free / 2**30, 2) if free else None,
             device=str(dev))
    return mode


def _load_dit_for(options: EngineOptions, infos: Mapping[str, wt.FileInfo], patches: Mapping[int, wt.FileInfo],
                  first: int, lora: wt.FileInfo | None, dev: torch.device, dt: torch.dtype,
                  mode: str) -> WanInfiniteTalk:
    """The DiT as ``options`` ask for it: base + first patch, LoRA merged if the preset uses it, fp8 if asked."""
    emit("engine.load_dit", dit=infos["dit"].path.name, patch=patches[first].path.name, device=str(dev),
         dtype=str(dt), memory_mode=mode)
    fp8_targets: tuple[str, ...] = ()
    if options.fp8 and options.fast:
        from engine import fast

        if fast.supports_fp8(dev):
            fp8_targets = fast.fp8_targets(adapter_swap=len(patches) == 2)
        else:
            emit("engine.fp8_unsupported", device=str(dev), dtype=str(dt),
                 note="engine.fp8 needs CUDA compute capability 8.9+; the DiT stays in dtype")
    dit, report = load_dit(infos["dit"], patches[first], device=dev, dtype=dt, lora=lora,
                           lora_strength=options.lora_strength, memory_mode=mode, fp8_targets=fp8_targets)
    if report is not None:
        emit("engine.lora_merged", file=lora.path.name if lora else None, strength=options.lora_strength,
             weights=report.applied, inert_keys=report.skipped_inert[:5])
        if report.unknown:
            emit("engine.lora_unknown_keys", logging.WARNING, keys=report.unknown[:10], count=len(report.unknown))
    return dit


def load_tokenizer(info: wt.FileInfo, files: Mapping[str, str]) -> tuple[Tokenizer, str]:
    """The umT5 tokenizer and where it came from: the text-encoder file's ``spiece_model`` tensor, else the
    ``spiece.model`` named by ``files["tokenizer"]`` (engine.files.tokenizer; the config layer makes it absolute)."""
    from engine.text_encoder import Tokenizer

    blob = wt.extra_tensor(info, "spiece_model")
    if blob is not None:
        return Tokenizer.from_proto(bytes(blob.numpy().tobytes())), f"{info.path} (spiece_model tensor)"
    path = files.get("tokenizer")
    if not path:
        raise wt.WeightsError(
            f"{info.path}: has no 'spiece_model' tokenizer tensor; set engine.files.tokenizer in config.yaml to the "
            "spiece.model of google/umt5-xxl")
    try:
        return Tokenizer.from_file(Path(path)), f"{path} (engine.files.tokenizer)"
    except OSError as e:
        raise wt.WeightsError(f"{path}: cannot read the tokenizer named by engine.files.tokenizer: "
                              f"{e.strerror or e}") from e
    except (RuntimeError, ValueError) as e:  # sentencepiece's parse error, or ids that are not umT5's
        raise wt.WeightsError(f"{path}: not a umT5 SentencePiece model (engine.files.tokenizer): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def tokenizer_line(info: wt.FileInfo | None, files: Mapping[str, str]) -> tuple[bool, str]:
    """doctor's line for the tokenizer: (ok, line) naming where it comes from."""
    if info is None:
        return True, f"{'absent':<8} {'tokenizer':<13} (comes with the text encoder file)"
    if any(r in info.tensors for r in ("spiece_model", info.prefix + "spiece_model")):
        return True, f"{'ok':<8} {'tokenizer':<13} {info.path}: spiece_model tensor inside the text encoder file"
    path = files.get("tokenizer")
    if not path:
        return False, (f"{'MISSING':<8} {'tokenizer':<13} {info.path} has no spiece_model tensor; set "
                       "engine.files.tokenizer to the spiece.model of google/umt5-xxl")
    try:
        tok, _ = load_tokenizer(info, files)
    except wt.WeightsError as e:
        return False, f"{'BAD':<8} {'tokenizer':<13} {e}"
    return True, f"{'ok':<8} {'tokenizer':<13} {path} (engine.files.tokenizer), {tok.vocab_size} pieces"
