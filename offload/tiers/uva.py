"""A CUDA-device tensor that aliases pinned host memory (unified virtual addressing), without CuPy.

A pinned (registered, mapped) host buffer has the same address on the GPU. Wrapping that address in a
DLPack capsule that says "CUDA device" gives a torch CUDA tensor whose every kernel (index_select,
copy_, a custom gather) reads host RAM over PCIe directly: a gather of scattered chunks becomes one
kernel instead of one copy per chunk. The view keeps its base tensor alive; it is only valid while
the base stays pinned (e.g. while its HostPool is open).
"""
from __future__ import annotations

import ctypes
import threading

import torch

_KDL_CPU, _KDL_CUDA = 1, 2
_KDL_UINT = 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]

# address of a live DLManagedTensor -> (struct, shape array, base tensor): what the capsule points into
_LIVE: dict[int, tuple] = {}
_LIVE_LOCK = threading.Lock()


@_DELETER
def _release(managed) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(ctypes.addressof(managed.contents), None)


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def alias(base: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor on `device` with base's bytes at base's address, viewed as `dtype` (default base.dtype).

    base must be contiguous. For device "cuda", base must be pinned (mapped) host memory.
    """
    if not base.is_contiguous():
        raise ValueError("alias() needs a contiguous base tensor")
    device = torch.device(device)
    dtype = base.dtype if dtype is None else dtype
    nbytes = base.numel() * base.element_size()
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _DLManagedTensor()
    managed.dl_tensor.data = base.data_ptr()
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        managed.dl_tensor.device = _DLDevice(_KDL_CUDA, index)
    else:
        managed.dl_tensor.device = _DLDevice(_KDL_CPU, 0)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DLDataType(_KDL_UINT, 8, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None        # NULL strides = compact row-major
    managed.dl_tensor.byte_offset = 0
    managed.deleter = _release
    with _LIVE_LOCK:
        _LIVE[ctypes.addressof(managed)] = (managed, shape, base)
    capsule = _capsule_new(ctypes.addressof(managed), b"dltensor", None)
    raw = torch.utils.dlpack.from_dlpack(capsule)                              # raw: [nbytes] uint8
    if base.dim() == 0:
        return raw.view(dtype).reshape(())
    last = base.shape[-1] * base.element_size() // torch.empty((), dtype=dtype).element_size()
    return raw.view(dtype).view(*base.shape[:-1], last)                        # same shape, last dim rescaled


def uva_view(pinned: torch.Tensor, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """The CUDA alias of a pinned host tensor: kernels on `device` read host RAM through it, zero copy."""
    if not pinned.is_pinned():
        raise ValueError("uva_view() needs a pinned host tensor (HostPool.slab on a CUDA machine)")
    return alias(pinned, torch.device(device or "cuda"), dtype)
