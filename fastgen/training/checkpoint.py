"""Atomic, verifiable training checkpoints.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>`` written by
``accelerate.Accelerator.save_state`` (optimisers, lr schedulers, RNG states) plus, through the
save-state hook, one folder per network (``student/``, ``fake_score/``, ... and ``student_ema/``;
diffusers networks with ``save_pretrained`` so each folder loads with ``from_pretrained``) and
``trainer_state.json`` / ``method_state.pt``.

Atomicity: everything is written into ``checkpoint-<step>.tmp``; the last file written is the marker
``COMPLETE.json``, a manifest of every file's size; only then is the folder renamed to
``checkpoint-<step>`` (``os.replace``, atomic on one file system). A save killed at any point leaves
either a ``.tmp`` folder (ignored, deleted by the next save) or the complete checkpoint.
:func:`verify_checkpoint` checks the marker and every size, so a checkpoint truncated later
(disk full, copy interrupted) is also recognised; ``resume_from_checkpoint="latest"`` then falls back
to the newest checkpoint that verifies, while an explicit path gives an error naming the bad file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

MARKER = "COMPLETE.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or corrupt (the message names the file)."""


# ---------------------------------------------------------------------- network folders
def save_network(module: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Save a network's weights into ``folder``: ``save_pretrained`` for diffusers/peft-style models,
    otherwise ``model.safetensors`` (shared tensors handled by ``safetensors.torch.save_model``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_pretrained") and hasattr(module, "config"):
        module.save_pretrained(folder, safe_serialization=True)
    else:
        from safetensors.torch import save_model

        save_model(module, str(folder / WEIGHTS_NAME))


def network_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the ``.safetensors`` files in ``folder`` (one file or diffusers shards)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint network folder {str(folder)!r} holds no .safetensors weights.")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read checkpoint file {str(file)!r}: {err}") from None
    return state


def _alias_shared(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``save_model`` writes a tensor registered under several names (e.g. one critic shared by MSD's students)
    once; give the module's other names of that tensor the saved copy."""
    names: dict[tuple, list[str]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if tensor.numel():
            names.setdefault((tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)), []).append(key)
    for group in names.values():
        saved = next((k for k in group if k in state), None)
        if saved is not None:
            for key in group:
                state.setdefault(key, state[saved])
    return state


def load_network(module: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Load :func:`save_network`'s folder into ``module`` (strict: every key must match; a tensor shared by
    several names is saved once and loaded into all of them)."""
    state = _alias_shared(module, network_state_dict(folder))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint network folder {str(folder)!r} does not fit the network: {err}") from None


# ---------------------------------------------------------------------- manifest
def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def write_marker(folder: str | os.PathLike, step: int) -> None:
    """Write the manifest marker (last file of a checkpoint), flushed to disk."""
    folder = Path(folder)
    data = {"step": int(step), "files": _file_sizes(folder)}
    tmp = folder / (MARKER + ".part")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)


def verify_checkpoint(folder: str | os.PathLike) -> int:
    """Return the step of a complete checkpoint, or raise :class:`CheckpointError` naming the bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {str(folder)!r} is not a folder.")
    marker = folder / MARKER
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete: its marker file {str(marker)!r} is missing "
                              f"(the save was interrupted).")
    try:
        data = json.loads(marker.read_text())
        files, step = data["files"], int(data["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint marker file {str(marker)!r} is corrupt ({err}).") from None
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete: file {str(path)!r} is missing.")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint file {str(path)!r} is truncated or corrupt: {actual} bytes, "
                                  f"the manifest says {size}.")
    return step


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-<step>`` folder (complete or not), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike, log=None) -> Path | None:
    """The newest checkpoint that verifies (older ones are tried when a newer one is broken)."""
    for step, folder in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as err:
            if log is not None:
                log(f"skipping checkpoint {folder.name}: {err}")
    return None


def finalize_checkpoint(tmp: Path, final: Path, step: int) -> None:
    """Write the marker into ``tmp`` and rename it to ``final`` (replacing an older ``final``)."""
    write_marker(tmp, step)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    try:  # make the rename durable
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rotate_checkpoints(output_dir: str | os.PathLike, limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``limit`` and stale ``.tmp`` folders; return the deleted."""
    output_dir = Path(output_dir)
    removed = []
    for p in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if limit is None:
        return removed
    complete = []
    for step, folder in list_checkpoints(output_dir):
        try:
            verify_checkpoint(folder)
            complete.append(folder)
        except CheckpointError:
            pass
    for folder in complete[: max(0, len(complete) - limit)]:
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
