"""The power-iteration state of one SRN-C layer.

``PowerIterationState`` owns everything a layer keeps between optimizer steps besides its
weight: the unit vectors of its power iteration(s) (``u``, ``v``; the projected variant adds
``u_out``, ``v_out`` for the renormalization), the constants derived from them (the rank-one
kernels and the ops' per-layer constants), which weight they were refreshed for, and how far
the last refresh was from convergence. The tensors are the owning module's buffers (so
``state_dict``, ``.to()`` and DDP see them); this object is the one place that writes them.
The batched refresh (``batched_refresh.py``) and the module (``module.py``) both go through it.

Freshness is ``(weak reference to the weight tensor, its version counter)``: a refresh is due
when the weight is another tensor (``functional_call``, a replaced ``Parameter``) or was
written in place through autograd-visible ops (an optimizer step, ``copy_``,
``load_state_dict``). A weak reference, not ``id()``: a freed tensor's id can be reused.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, Optional, Tuple

import torch

from .conv_operator import ConvGeometry

VECTOR_NAMES = ("u", "v", "u_out", "v_out")
# Derived from the vectors: the rank-one kernels and the ops' constants. They are saved too, so a
# loaded layer computes bit for bit what the saved one did (a batched refresh and a per-layer
# recomputation differ in float rounding).
SAVED_CONSTANT_NAMES = ("_s1", "_direction", "_s1_out", "_consts")
# Depend on the geometry only: rebuilt, never saved.
GRAM_NAMES = ("_gram", "_gram_pinv")
FRESH_NAME = "_fresh"  # saved: the vectors were refreshed for exactly the saved weight


def version_of(tensor: torch.Tensor) -> int:
    """The tensor's version counter (inference tensors have none: -1)."""
    return -1 if tensor.is_inference() else tensor._version


def normal_tensors():
    """A context in which new tensors are normal ones even inside ``torch.inference_mode``:
    buffers made or refreshed there must stay writable once inference mode is left."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


def _random_unit(shape, dtype: torch.dtype, device, memory_format, eps: float) -> torch.Tensor:
    """A random unit vector of ``shape``, drawn in ``memory_format``'s element order (no copy into it)."""
    order = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}.get(len(shape))
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    if memory_format == last and order is not None:
        value = torch.randn([shape[i] for i in order], dtype=dtype, device=device).permute(
            *[order.index(j) for j in range(len(shape))])
    else:
        value = torch.randn(shape, dtype=dtype, device=device)
    return value.div_(torch.linalg.vector_norm(value).clamp_min(eps))


class PowerIterationState:
    """Vectors, derived constants, freshness and convergence of one layer (see the module docstring).

    ``buffers`` is the owning module's ``_buffers`` dict; ``projected`` whether the variant keeps
    the second power iteration (``u_out``, ``v_out``).
    """

    def __init__(self, buffers: Dict[str, Optional[torch.Tensor]], projected: bool) -> None:
        self._buffers = buffers
        self.vector_names: Tuple[str, ...] = VECTOR_NAMES if projected else VECTOR_NAMES[:2]
        self.version = 0  # bumped whenever the vectors or constants change (invalidates weight caches)
        self._refreshed_for = None  # (weakref to the weight, its version) or None
        # ||W v - sigma u|| / sigma of each power iteration's last step, (1, 1 or 2) tensor, or None
        self.residual: Optional[torch.Tensor] = None
        self.floor_warned = False
        self.lagged_steps = 0  # optimizer steps since the last refresh that skipped it (refresh_every > 1)
        # the vector buffers (tensor, version) the constants were derived from; None: the ones there now
        self._constants_for = None

    # ------------------------------------------------------------------ buffers
    def vector(self, name: str) -> Optional[torch.Tensor]:
        return self._buffers[name]

    @property
    def allocated(self) -> bool:
        return self._buffers["u"] is not None

    def shapes(self, geometry: ConvGeometry) -> Dict[str, tuple]:
        """The shape of every saved tensor for ``geometry``."""
        taps = geometry.taps
        slices = geometry.out_channels * geometry.in_channels // geometry.groups
        shapes = {name: geometry.output_shape() if name.startswith("u") else geometry.input_shape()
                  for name in self.vector_names}
        shapes.update({name: (1, slices, taps) for name in ("_s1", "_direction", "_s1_out")})
        shapes["_consts"] = (1, 2)
        return shapes

    def allocate(self, geometry: ConvGeometry, dtype: torch.dtype, device, memory_format, eps: float,
                 vectors: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Buffers for ``geometry``: the given ``vectors`` (by name, of their buffer's shape, dtype,
        device and memory format: stored as they are), random unit vectors for the others
        (uninitialized on the meta device) and zero constants, as normal tensors even under
        inference mode."""
        device = torch.device(device)
        vectors = vectors or {}
        with normal_tensors(), torch.no_grad():
            for name, shape in self.shapes(geometry).items():
                if name in vectors:
                    value = vectors[name]
                    if value.shape != shape or value.dtype != dtype or value.device != device:
                        raise ValueError(f"vector {name!r}: expected {tuple(shape)} {dtype} on {device}, got "
                                         f"{tuple(value.shape)} {value.dtype} on {value.device}")
                elif device.type == "meta":
                    value = torch.empty(shape, dtype=dtype, device=device)
                elif name in self.vector_names:
                    value = _random_unit(shape, dtype, device, memory_format, eps)
                else:
                    value = torch.zeros(shape, dtype=dtype, device=device)
                if name in self.vector_names:
                    value = value.contiguous(memory_format=memory_format)
                self._buffers[name] = value
            self.set_gram(geometry, dtype, device)
        self.residual = None
        self._committed()

    def set_gram(self, geometry: ConvGeometry, dtype: torch.dtype, device) -> None:
        """The spatial Gram matrix of ``geometry`` and its pseudo-inverse (from the geometry alone)."""
        with normal_tensors():
            self._buffers["_gram"] = geometry.kernel_gram(dtype, device)
            self._buffers["_gram_pinv"] = geometry.kernel_gram_pinv(dtype, device)

    def op_inputs(self) -> tuple:
        """``(s1, direction, s1_out, gram, consts)``: the tensors the reweight op takes."""
        b = self._buffers
        return (b["_s1"], b["_direction"], b["_s1_out"], b["_gram"], b["_consts"])

    def record_vectors(self) -> None:
        """Declare the stored constants derived from the vectors stored now."""
        self._constants_for = tuple((self._buffers[name], version_of(self._buffers[name])) for name in self.vector_names)

    def constants_stale(self) -> bool:
        """True when a vector was written or replaced from outside (an EMA update of the buffers, a
        manual ``copy_``) since the constants were derived: they must be derived again."""
        recorded = self._constants_for
        if recorded is None:
            self.record_vectors()
            return False
        for name, (tensor, version) in zip(self.vector_names, recorded):
            current = self._buffers[name]
            if current is not tensor or version_of(current) != version:
                return True
        return False

    # ------------------------------------------------------------------ freshness
    def is_stale(self, weight: torch.Tensor) -> bool:
        """True unless the vectors were refreshed for ``weight`` (this tensor, at this version)."""
        key = self._refreshed_for
        return key is None or key[0]() is not weight or key[1] != version_of(weight)

    def mark_fresh(self, weight: Optional[torch.Tensor]) -> None:
        """Declare the current vectors refreshed for ``weight`` (None: for no weight)."""
        self._refreshed_for = None if weight is None else (weakref.ref(weight), version_of(weight))

    # ------------------------------------------------------------------ commits
    def commit_pairs(self, vectors: Dict[str, torch.Tensor], s1, direction, s1_out, consts) -> list:
        """``(buffer, new value)`` for each buffer a refresh's results go to."""
        b = self._buffers  # not Module.__getattr__: this runs for every layer on every step
        pairs = [(b[name], value) for name, value in vectors.items()]
        return pairs + [(b["_s1"], s1), (b["_direction"], direction), (b["_s1_out"], s1_out), (b["_consts"], consts)]

    def _committed(self) -> None:
        self.version += 1
        if self._buffers["u"] is not None:
            self.record_vectors()

    def committed(self, weight: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None) -> None:
        """Record that the buffers of ``commit_pairs`` hold a refresh's results, made for ``weight``
        (None: not for a particular weight, e.g. constants recomputed from loaded vectors)."""
        self._committed()
        if weight is not None:
            self.mark_fresh(weight)
            self.lagged_steps = 0
        if residual is not None:
            self.residual = residual

    # ------------------------------------------------------------------ copies
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_refreshed_for"] = None  # a weak reference: the owning module carries freshness over
        state["_constants_for"] = None  # a copy's constants are derived from the copy's vectors
        return state
