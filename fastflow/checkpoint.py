"""Checkpoints: model architecture + weights (+ optimizer state), written atomically and loaded without running
any code from the file; shareable ``model.safetensors`` + ``config.json`` folders."""

from __future__ import annotations

import collections
import errno
import inspect
import json
import os
import pickle
import re
import reprlib
import types
import typing
import warnings
import zipfile
from typing import Any

import torch

from fastflow.allocation_budget import AllocationBudget, construction_budget, construction_ops
from fastflow.atomic_file import atomic_file
from fastflow.models import NICE, NSF, FlowModel, Glow, Jet, RealNVP, TabularFlow
from fastflow.nn.state_upgrade import upgraded_state_dict
from fastflow.ops._checks import FLOAT_DTYPES
from fastflow.warning_location import warn_at_caller

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "build_model",
    "check_extra",
    "load_checkpoint",
    "load_pretrained",
    "save_checkpoint",
    "save_pretrained",
]

RUNTIME_OPTIONS = ("reversible",)
MODEL_CLASSES: dict[str, type[FlowModel]] = {
    "Glow": Glow,
    "Jet": Jet,
    "RealNVP": RealNVP,
    "NICE": NICE,
    "TabularFlow": TabularFlow,
    "NSF": NSF,
}
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SAVED_WITH = "fastflow_config"  # the safetensors metadata key of the class and config the weights were saved with
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header
MAX_LISTED = 5  # error messages name at most this many parameters of each kind, then give the count


def _where(source: str, message: str) -> str:
    return f"{source}: {message}" if source else message


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    """Whether the plain (JSON-like) ``value`` fits the constructor annotation ``hint``; a list stands for a
    tuple, as JSON has no tuples. Unknown annotations accept any value (the constructor checks it)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return value is None
    if origin is typing.Union or origin is getattr(types, "UnionType", typing.Union):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return _is_plain(value)


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is built from JSON's types only (tuples allowed for lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _model_class(name: Any, config: Any, source: str = "") -> type[FlowModel]:
    """The class ``name`` names, after checking that ``config`` holds only its constructor's arguments, each of
    the annotated plain type (``ValueError`` naming the first bad key, prefixed by ``source``)."""
    if not isinstance(name, str) or name not in MODEL_CLASSES:
        raise ValueError(_where(source, f"unknown model class {name!r}; expected one of {sorted(MODEL_CLASSES)}"))
    if not isinstance(config, dict):
        raise ValueError(_where(source, f"the config of a {name} must be a dict, got {type(config).__name__}"))
    cls = MODEL_CLASSES[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations this Python cannot evaluate: leave the checks to the constructor
        hints = {}
    for key, value in config.items():
        if key not in params:
            raise ValueError(_where(source, f"config key {key!r} is not an argument of {name} (one of {params})"))
        try:
            matches = _matches(value, hints.get(key, Any))
        except RecursionError:  # a crafted file's value nested thousands deep
            matches = False
        if not matches:
            expected = _hint_name(hints[key]) if key in hints else "a plain JSON value"
            got = reprlib.repr(value)  # bounded in depth and length
            raise ValueError(_where(source, f"config key {key!r} of {name} must be {expected}, got {got}"))
    return cls


def build_model(
    name: str,
    config: dict[str, Any],
    source: str = "",
    weight_bytes: int | None = None,
    weight_tensors: int | None = None,
) -> FlowModel:
    """Construct a model of class ``name`` (a key of ``MODEL_CLASSES``) from its ``config``: only the
    constructor's arguments, each a plain value of its annotated type (a list for a tuple); missing ones take
    the constructor's defaults. A bad class, key or value is a ``ValueError`` naming it, prefixed by ``source``
    (e.g. the file it came from). With ``weight_bytes`` (the size of the weights the model is built for), building
    may allocate at most :func:`~fastflow.allocation_budget.construction_budget` bytes, and with
    ``weight_tensors`` (their number) run at most :func:`~fastflow.allocation_budget.construction_ops` tensor
    operations, else ``ValueError``."""
    cls = _model_class(name, config, source)
    try:
        if weight_bytes is None:
            return cls(**config)
        max_ops = None if weight_tensors is None else construction_ops(weight_tensors)
        with AllocationBudget(construction_budget(weight_bytes), max_ops, f"this {name}"):
            return cls(**config)
    except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: a value no check caught, raised by torch
        raise ValueError(_where(source, f"invalid config for {name}: {err}")) from err


def _tensor_sizes(state_dict: object) -> tuple[int, int]:
    """The bytes and the number of the tensors of a loaded ``state_dict`` (0 for anything else: its loading says
    what is wrong)."""
    if not isinstance(state_dict, dict):
        return 0, 0
    tensors = [t for t in state_dict.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors), len(tensors)


def _config_differences(
    stored: dict[str, Any],
    current: dict[str, Any],
    cls: type[FlowModel],
    places: tuple[str, str] = ("in the file", "in the model"),
) -> list[str]:
    """``"key: A in the file, B in the model"`` (``places``) for each architecture key whose values differ (missing
    keys count as the constructor's default; tuples and lists compare equal, numbers by value: 3 and 3.0)."""
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}
    stored, current = {**defaults, **stored}, {**defaults, **current}
    return [
        f"{key}: {stored.get(key)!r} {places[0]}, {current.get(key)!r} {places[1]}"
        for key in sorted(set(stored) | set(current))
        if key not in RUNTIME_OPTIONS
        and json.loads(json.dumps(stored.get(key))) != json.loads(json.dumps(current.get(key)))
    ]


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _load_weights(model: FlowModel, state_dict: Any, source: str, adopt_dtype: bool = False) -> None:
    """``model.load_state_dict(state_dict)`` with a short ``ValueError`` on a mismatch: only the missing,
    unexpected, wrongly shaped and wrongly typed parameter names, a handful of each with the count. With
    ``adopt_dtype`` (a model built for the file) the model first takes the weights' floating dtype (float64 weights
    stay float64); otherwise every weight must have the model's dtype (nothing is converted silently)."""
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise ValueError(f"{source}: the weights are not a mapping of parameter names to tensors")
    try:
        state_dict = upgraded_state_dict(state_dict)  # weights saved in earlier layouts load too
    except (RuntimeError, ValueError, IndexError) as err:
        message = " ".join(str(err).split())[:300]
        raise ValueError(f"{source}: weights in an earlier layout that cannot be upgraded: {message}") from err
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [
        f"{k} {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if adopt_dtype and not (missing or unexpected or reshaped):
        dtypes = {v.dtype for k, v in state_dict.items() if v.is_floating_point() and expected[k].is_floating_point()}
        if len(dtypes) > 1:
            raise ValueError(f"{source}: the floating-point weights have several dtypes ({sorted(map(str, dtypes))})")
        unsupported = dtypes - set(FLOAT_DTYPES)  # float8: accepted here, the first forward failed deep in an op
        if unsupported:
            raise ValueError(
                f"{source}: the weights are {unsupported.pop()}; models run in float16, bfloat16, float32 or float64"
            )
        if dtypes:
            model.to(dtypes.pop())
            expected = model.state_dict()
    retyped = [
        f"{k} {v.dtype} in the file, {expected[k].dtype} in the model"
        for k, v in state_dict.items()
        if k in expected and v.dtype != expected[k].dtype
    ]
    problems = [
        f"{len(names)} {kind} ({_few(names)})"
        for kind, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", reshaped),
            ("of another dtype", retyped),
        )
        if names
    ]
    if problems:
        raise ValueError(
            f"{source}: the weights do not match the {type(model).__name__} architecture: {'; '.join(problems)}"
        )
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(f"{source}: cannot load the weights: {' '.join(str(err).split())[:300]}") from err


def _check_loadable(value: Any, name: str) -> None:
    """``TypeError`` naming ``name`` unless ``value`` is made of what ``torch.load(weights_only=True)`` reads
    back: plain Python values, tensors and parameters (not subclasses), dtypes, devices, and lists, tuples, sets
    (not frozensets), sizes and dicts of them."""
    if value is None or type(value) in (bool, int, float, complex, str, bytes):  # not subclasses (numpy, enums)
        return
    if type(value) in (torch.Tensor, torch.nn.Parameter) or isinstance(value, (torch.dtype, torch.device)):
        return  # not tensor subclasses, which weights-only loading refuses
    if type(value) in (dict, collections.OrderedDict):
        for k, v in value.items():
            _check_loadable(k, f"{name} key")
            _check_loadable(v, f"{name}[{k!r}]")
    elif type(value) in (list, tuple, set, torch.Size):  # not frozenset, which weights-only loading refuses
        for i, v in enumerate(value):
            _check_loadable(v, f"{name}[{i}]")
    else:
        raise TypeError(
            f"{name} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint cannot hold "
            "(it loads with weights_only=True): store plain Python values, tensors, lists and dicts"
        )


def check_extra(extra: dict[str, Any]) -> None:
    """``TypeError`` naming the entry unless every value of ``extra`` (:func:`save_checkpoint`'s extra entries) is
    one a checkpoint holds: for a caller that checks them before the work whose result it saves."""
    for key, value in extra.items():
        _check_loadable(value, f"extra {key!r}")


def _unwrapped(model: Any) -> Any:
    """``model`` without its ``torch.compile`` (``_orig_mod``) and DistributedDataParallel / DataParallel
    (``module``) wrappers, whose class and parameter names are not the model's."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(model, torch.nn.Module) and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _saved_model(model: Any) -> FlowModel:
    """:func:`_unwrapped` ``model`` (the wrappers' class and parameter names would not load back); ``TypeError``
    naming ``model`` unless what is inside is an instance of a class of ``MODEL_CLASSES`` itself, not of a subclass
    (a file names the class it is rebuilt as)."""
    model = _unwrapped(model)
    if MODEL_CLASSES.get(type(model).__name__) is not type(model):
        raise TypeError(
            f"model must be a {', '.join(sorted(MODEL_CLASSES))} (the class itself, not a subclass: the file is "
            f"loaded back as the class it names), got a {type(model).__module__}.{type(model).__qualname__}"
        )
    return model


def save_checkpoint(
    path: str | os.PathLike[str],
    model: FlowModel,
    optimizer: torch.optim.Optimizer | None = None,
    **extra: Any,
) -> None:
    """Write ``{model class, config, state_dict, optimizer state, extra}`` to ``path`` via a temporary file
    in the same folder and an atomic rename, so a run killed mid-write or a full disk leaves the previous file
    intact (``OSError`` naming ``path``). The file gets the mode of any new file (0666 less the umask).

    ``model`` may be wrapped by ``torch.compile`` or (Distributed)DataParallel: the model inside is saved. It must be
    an instance of a fastflow model class, not of a subclass, and everything must load back with
    ``torch.load(weights_only=True)``: ``extra`` values are plain Python values, tensors, lists, tuples and dicts of
    them (a ``TypeError`` naming ``model`` or the entry otherwise, before writing)."""
    model = _saved_model(model)
    payload = {
        "model_class": type(model).__name__,
        "config": dict(model.config),
        "state_dict": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "extra": extra,
    }
    _check_loadable(payload["config"], "the model config")
    _check_loadable(payload["optimizer"], "the optimizer state")
    check_extra(extra)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def _head(path: str) -> bytes | None:
    """The first bytes of the file ``path`` (None where it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(10)
    except OSError:
        return None


def _shared_format(path: str) -> str | None:
    """Where ``path`` is a folder or a file of :func:`save_pretrained`'s format (``.safetensors`` by its name or
    header, ``config.json``): that it is no checkpoint and what loads it; else None."""
    pretrained = f"a folder of {WEIGHTS_NAME} and {CONFIG_NAME} loads with FlowModel.from_pretrained"
    if os.path.isdir(path):
        return f"{path!r} is a folder, not a checkpoint file: {pretrained}"
    head = _head(path)
    header = head is not None and head[8:10] == b'{"'  # safetensors: an 8-byte header length, then JSON
    named = os.path.isfile(path) and (path.endswith(".safetensors") or os.path.basename(path) == CONFIG_NAME)
    if header or named:
        return f"{path!r} is not a PyTorch checkpoint but a file of a shared model folder: {pretrained}"
    return None


def _unreadable(path: str, err: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed with ``err``, in one line naming the file: a pickle that
    would run code or that safe loading refuses, a folder or file of :func:`save_pretrained`'s format, a file
    in neither of torch.save's formats (a zip archive, a binary pickle), or the error itself (with its type when
    its message alone says little)."""
    unsafe = f"{path!r} is not a safe fastflow checkpoint"
    found = re.search(r"GLOBAL (\S+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if found:
        return f"{unsafe}: it would call {found.group(1)!r}, which is refused without running it"  # repr: no escapes
    shared = _shared_format(path)
    if shared is not None:
        return shared
    head = _head(path)
    if head is not None and not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip, or a pickle
        what = "it is empty" if not head else "it does not start like one (a zip archive, or a pickle of protocol >= 2)"
        return f"{path!r} is not a PyTorch checkpoint: {what}"
    if isinstance(err, pickle.UnpicklingError):
        return f"{unsafe}: it holds pickle instructions that safe (weights-only) loading refuses"
    message = " ".join(str(err).split())[:300]
    zip_unread = (isinstance(err, OSError) and err.errno == errno.EINVAL) or "zip archive" in message
    if head is not None and head.startswith(b"PK") and zip_unread:  # torch's OSError(22): "Invalid argument"
        return f"cannot read checkpoint {path!r}: it is truncated or corrupt (its zip archive does not read back)"
    if isinstance(err, OSError):
        message = err.strerror or message
    elif len(message) < 40:  # a bare key, index or nothing: the type says what went wrong
        message = f"{type(err).__name__}: {message}" if message else type(err).__name__
    return f"cannot read checkpoint {path!r}: {message}"


def weights_only_loader_patched() -> bool:
    """Whether the installed torch has the fixes of the published escapes from ``torch.load(weights_only=True)``
    (torch >= 2.10): below, a crafted ``.pt`` can corrupt memory (< 2.10) or run code (< 2.6)."""
    return torch.torch_version.TorchVersion(torch.__version__) >= (2, 10)


def _check_zip_members(path: str) -> None:
    """``ValueError`` naming ``path`` where its zip archive (torch.save's format) holds a member whose bytes fail
    their CRC-32: ``torch.load`` does not check them, so a flipped bit in a weight loaded silently. Members saved
    without one (CRC 0: ``torch.serialization.set_crc32_options(False)``) are not checked; files that are no zip
    archive, or whose archive does not read back, are left to ``torch.load`` and :func:`_unreadable`."""
    head = _head(path)
    if head is None or not head.startswith(b"PK"):
        return
    bad = None
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.CRC == 0:  # torch.serialization.set_crc32_options(False) stores none
                    continue
                try:
                    with archive.open(member) as f:
                        while f.read(2**24):  # the reader compares the CRC at the end
                            pass
                except zipfile.BadZipFile:
                    bad = member.filename
                    break
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError):
        return
    if bad is not None:
        raise ValueError(
            f"cannot read checkpoint {path!r}: it is corrupt (the bytes of its member {bad!r} fail their checksum)"
        )


def load_checkpoint(
    path: str | os.PathLike[str], model: FlowModel | None = None, map_location: str | torch.device = "cpu"
) -> tuple[FlowModel, dict[str, Any]]:
    """Load ``path`` with ``torch.load(weights_only=True)``, so a crafted file cannot run code (on torch >= 2.10;
    older releases have published escapes, and a warning says so): it fails with a one-line ``ValueError`` naming
    the file, as do a file that is no PyTorch checkpoint (for a folder or a file
    of :func:`save_pretrained`'s format, the message points to ``from_pretrained``) and one whose zip member fails
    its checksum (a flipped bit in a weight). Builds the model from the stored (validated) config and moves it to
    ``map_location``, or loads into ``model`` (the model inside a ``torch.compile`` or (Distributed)DataParallel
    wrapper, which is returned) after checking that its architecture matches (``ValueError`` naming the config
    keys that differ, or the missing, unexpected and wrongly shaped parameters). Returns ``(model, payload)`` with
    payload keys ``model_class``, ``config``, ``state_dict``, ``optimizer``, ``extra``."""
    where = f"checkpoint {os.fspath(path)!r}"
    if not weights_only_loader_patched():
        warn_at_caller(
            f"torch {torch.__version__}'s weights-only loader has published escapes (CVE-2025-32434 below 2.6: code "
            "execution; CVE-2026-24747 below 2.10: memory corruption): load only checkpoints you wrote or trust, "
            "upgrade torch to 2.10 or later, or share models as save_pretrained folders (safetensors)",
            UserWarning,
        )
    _check_zip_members(os.fspath(path))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # stderr stays one line
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # untrusted bytes may fail in any way: one line naming the file
        raise ValueError(_unreadable(os.fspath(path), err)) from err
    if not isinstance(payload, dict) or not {"model_class", "config", "state_dict"} <= payload.keys():
        raise ValueError(_shared_format(os.fspath(path)) or f"{os.fspath(path)!r} is not a fastflow checkpoint")
    payload.setdefault("optimizer", None)
    payload.setdefault("extra", {})
    if not isinstance(payload["extra"], dict):
        raise ValueError(f"{where}: 'extra' must be a dict, got {type(payload['extra']).__name__}")
    name, config = payload["model_class"], payload["config"]
    if model is None:
        model = build_model(name, config, where, *_tensor_sizes(payload["state_dict"]))
        _load_weights(model, payload["state_dict"], where, adopt_dtype=True)
        return model.to(map_location), payload
    model = _unwrapped(model)  # the weights load into the model a torch.compile or DataParallel wraps
    cls = _model_class(name, config, where)
    if type(model) is not cls:
        raise ValueError(f"{where} holds a {name}, which does not match the {type(model).__name__} model")
    differences = _config_differences(config, model.config, cls)
    if differences:
        raise ValueError(f"{where} holds a {name} that does not match the model: {'; '.join(differences)}")
    _load_weights(model, payload["state_dict"], where)
    return model, payload


def save_pretrained(directory: str | os.PathLike[str], model: FlowModel) -> None:
    """Write ``directory/model.safetensors`` (the ``state_dict``, contiguous CPU tensors; its metadata holds the
    class and config too) and ``directory/config.json`` (``{"model_class", "config", "fastflow_version"}``, tuples
    as lists), each atomically; the format models are shared in, loaded by :func:`load_pretrained` without running
    code, which refuses a folder whose two files come from different saves (a save stopped between them). Wrappers
    and subclasses as in :func:`save_checkpoint` (``TypeError`` naming ``model``, before writing)."""
    from safetensors.torch import save_file

    from fastflow import __version__

    model = _saved_model(model)
    config = json.loads(json.dumps(model.config))  # tuples -> lists, and a TypeError for non-JSON values
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if tensor.numel() and (
            storage.data_ptr() in storages or storage.nbytes() != tensor.numel() * tensor.element_size()
        ):
            tensor = tensor.clone()  # safetensors refuses tensors that share or view a larger storage
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    meta = {"model_class": type(model).__name__, "config": config, "fastflow_version": __version__}
    saved_with = json.dumps({"model_class": meta["model_class"], "config": config}, sort_keys=True)
    with atomic_file(os.path.join(directory, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", SAVED_WITH: saved_with})
    with atomic_file(os.path.join(directory, CONFIG_NAME)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2) + "\n")


def _safetensors_header(path: str) -> tuple[int, int, dict[str, str]]:
    """``(bytes of the tensors, number of tensors, metadata)`` from the header of the safetensors file ``path``
    (an 8-byte little-endian length, then JSON), read before a model is built for it; ``ValueError`` naming the
    file where it is missing, unreadable or no safetensors file (a Git LFS pointer, left by a clone made without
    git-lfs, is named as one)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            text = f.read(length) if 0 < length <= min(size - 8, MAX_HEADER_BYTES) else b""
    except OSError as err:
        raise ValueError(f"cannot read {path!r}: {err.strerror or err}") from err
    if head.startswith(b"version "):
        raise ValueError(f"{path!r} is a Git LFS pointer, not the weights: fetch them (git lfs pull)")
    try:
        header = json.loads(text)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        stored = sum(int(v["data_offsets"][1]) - int(v["data_offsets"][0]) for v in tensors.values())
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise TypeError("__metadata__ is no dict")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(f"{path!r} is not a safetensors file, or is corrupt: its header does not read") from err
    if stored > size - 8 - length:  # the header's sizes are what the model may be built to
        raise ValueError(f"{path!r} is truncated: its header declares {stored} bytes of tensors, it holds fewer")
    return stored, len(tensors), metadata


def _check_saved_with(saved_with: object, model: FlowModel, weights_path: str, config_path: str) -> None:
    """``ValueError`` naming both files where the class and config stored with the weights (by
    :func:`save_pretrained`; absent in folders written before it stored them) differ from those of ``model``,
    built from ``config.json`` (so a key left to its default, or ``32`` for ``[32, 32]``, is no difference)."""
    if saved_with is None:
        return
    try:
        saved = json.loads(str(saved_with))
        places = ("with the weights", "in config.json")
        differences = _config_differences(saved["config"], model.config, type(model), places)
        same_class = saved["model_class"] == type(model).__name__
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{weights_path!r}: its stored config does not read ({err})") from err
    if not same_class or differences:
        what = "; ".join(differences) if same_class else f"a {saved['model_class']} with the weights"
        raise ValueError(
            f"{config_path!r} does not match the config {weights_path!r} was saved with ({what}): the folder mixes "
            "two saves (one stopped between its two files) or config.json was edited; save the model again"
        )


def _check_device(map_location: str | torch.device) -> None:
    """``ValueError`` naming ``map_location`` unless tensors can be made on it here (safetensors' own error for a
    CUDA device on a machine without one speaks of pinned memory)."""
    try:
        torch.empty(0, device=map_location)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise ValueError(f"map_location {str(map_location)!r} is not available here: {err}") from err


def load_pretrained(
    directory: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    expected_class: type[FlowModel] | None = None,
) -> FlowModel:
    """The model saved by :func:`save_pretrained` in ``directory``, on ``map_location``. ``config.json`` is
    validated (known class, only constructor arguments of plain types; a bad key is named) and, with
    ``expected_class``, must hold that class or a subclass; the weights must match the architecture exactly
    (``ValueError`` naming only the differing parameters)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if os.path.isfile(directory):
        raise ValueError(
            f"{os.fspath(directory)!r} is a file, not a folder of {WEIGHTS_NAME} and {CONFIG_NAME}: a checkpoint file "
            "loads with fastflow.checkpoint.load_checkpoint"
        )
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    try:
        with open(config_path, encoding="utf-8") as f:
            meta = json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read {config_path!r}: {err.strerror or err}") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; nesting thousands deep
        raise ValueError(f"{config_path!r} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or "model_class" not in meta or "config" not in meta:
        raise ValueError(f"{config_path!r} is not a fastflow config (needs 'model_class' and 'config')")
    cls = _model_class(meta["model_class"], meta["config"], repr(config_path))
    if expected_class is not None and not issubclass(cls, expected_class):
        raise ValueError(f"{os.fspath(directory)!r} holds a {meta['model_class']}, not a {expected_class.__name__}")
    weight_bytes, weight_tensors, metadata = _safetensors_header(weights_path)
    _check_device(map_location)
    model = build_model(meta["model_class"], meta["config"], repr(config_path), weight_bytes, weight_tensors)
    _check_saved_with(metadata.get(SAVED_WITH), model, weights_path, config_path)
    try:
        state_dict = load_file(weights_path, device=str(map_location))
    except (OSError, SafetensorError, RuntimeError) as err:  # untrusted bytes: one line naming the file
        raise ValueError(f"cannot read {weights_path!r}: {' '.join(str(err).split())[:300]}") from err
    _load_weights(model, state_dict, repr(weights_path), adopt_dtype=True)
    return model.to(map_location)
