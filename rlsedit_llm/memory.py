"""Memory planner: how many bytes an RLSEdit editor needs, and whether they fit on a device.

It works from sizes alone (``d_model``, ``d_k``, edited layers, state dtype, batch, model bytes),
outside the verified kernel; :meth:`rlsedit_llm.Editor.memory_plan` fills them in for an editor.

Per edited layer (``d_k`` the key width, the MLP inner size; ``d_v = d_model``; ``s`` the bytes
of one state entry, 8 for float64 and 4 for float32), :class:`~rlsedit_llm.kernel.rls.LayerRLS`
keeps

- ``C`` (d_k, d_k) and the anchor Gram ``gram0_`` (d_k, d_k): ``2 s d_k^2``;
- the master weights ``W`` and ``W0`` (d_k, d_v): ``2 s d_k d_v``;
- optionally ``G`` (``track_information=True``): ``s d_k^2`` more.

Besides the state, an editor needs

- **statistics**: the second moment ``E[k k^T]`` of every edited layer, summed in float64
  (``8 d_k^2`` per layer) while the statistics pass runs, and returned in float32 (``4 d_k^2``
  per layer) to :meth:`Editor.prepare`, which holds them until every layer's state is built;
- **temporaries of an edit** (``inplace=True``, the editor's path): ``LayerRLS.propose`` returns
  the new ``W`` and the factor ``G (d_k, u)`` and ``commit`` updates ``C`` in place
  (:mod:`rlsedit_llm.kernel.inplace`), so the editor holds, until the whole batch is written,
  one new ``W`` and one ``G`` per layer (``G`` stays in the transaction's undo log until the edit
  ends), plus ``F^T`` while a layer's step is computed: ``n_edit (s d_k d_v + s d_k u) + s d_k u``,
  no ``d_k^2`` term. An edit that retracts earlier facts (``EditConfig.replace``) keeps a copy of
  each layer's ``C`` until it ends, so that a failure after the retraction restores ``C``
  bitwise: ``replacing=True`` adds ``n_edit s d_k^2``. ``inplace=False`` plans the pure functions
  ``kernel.rls.woodbury_update`` / ``woodbury_downdate`` driven the way the editor drove them
  before (three ``d_k^2`` temporaries at once, ``L F^T``, its signed copy and the difference, then
  ``C + C^T`` and its half, and a pending ``C`` and ``W`` per layer):
  ``(n_edit + 3) s d_k^2`` on top of the state.
- **building a state**: the editor's scaled Gram and ``LayerRLS.__init__``'s temporaries (the
  identity, ``A``, the symmetrised copy, its Cholesky factor, the solve) come to about five
  ``d_k^2`` while the float32 moments are alive (measured: 8B widths, one float32 layer, RSS
  within 1 % of this figure plus the model and the interpreter's 0.6 GB).

``plan(...)`` adds these up; :func:`check_fits` compares the peak with a device's free memory and
raises :class:`InsufficientMemoryError` naming the sizes. The figures for the tensors the state
keeps are exact (a test compares them with ``nbytes``); the temporaries are the counts above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlsedit_llm.errors import HyperparameterError, InsufficientMemoryError

__all__ = [
    "InsufficientMemoryError",
    "MemoryPlan",
    "MODEL_SHAPES",
    "GPU_SIZES_GB",
    "plan",
    "free_memory",
    "check_fits",
    "memory_table",
    "format_bytes",
]

_DTYPE_BYTES = {torch.float64: 8, torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

#: Published shapes: d_model, d_k (MLP inner width), decoder layers, parameters (for the model's
#: own bf16 footprint). Five edited layers each (the published RLSEdit/MEMIT block).
MODEL_SHAPES: dict[str, dict] = {
    "SmolLM2-135M": dict(d_model=576, d_k=1536, n_layers=30, params=134.5e6),
    "Gemma-3-270M": dict(d_model=640, d_k=2048, n_layers=18, params=268.1e6),
    "Llama-3.2-1B": dict(d_model=2048, d_k=8192, n_layers=16, params=1.236e9),
    "Llama-3.2-3B": dict(d_model=3072, d_k=8192, n_layers=28, params=3.213e9),
    "Llama-3-8B": dict(d_model=4096, d_k=14336, n_layers=32, params=8.030e9),
    "Llama-3-70B": dict(d_model=8192, d_k=28672, n_layers=80, params=70.55e9),
}

#: Nominal GPU memory sizes (decimal GB, as sold: 24 GB e.g. RTX 4090/L4, 48 GB A6000/L40S,
#: 80 GB A100/H100, 141 GB H200).
GPU_SIZES_GB = (24, 48, 80, 141)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in _DTYPE_BYTES:
        raise HyperparameterError(f"unsupported dtype {dtype!r}; use float64, float32, bfloat16 or float16")
    return dtype


def format_bytes(n: float) -> str:
    """``n`` bytes as decimal GB/MB (``'1.64 GB'``)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes an editor needs (all figures in bytes; ``*_per_layer`` for one edited layer).

    Attributes
    ----------
    d_model, d_k, n_edit_layers, state_dtype, batch : the inputs
    model_bytes : the model's own weights (0 when unknown)
    state_per_layer : ``C`` and ``gram0_`` (and ``G`` when tracked)
    master_per_layer : ``W`` and ``W0`` in the state dtype
    statistics_per_layer : the float64 second moment ``8 d_k^2``
    edit_temporaries : extra bytes at the peak of one edit (``inplace=True``: the pending ``W``
        and factor ``G`` of every layer, no ``d_k^2`` term unless ``replacing``; ``inplace=False``:
        the pure update's pending states and temporaries)
    build_temporaries : extra bytes while building one layer's state
    """

    d_model: int
    d_k: int
    n_edit_layers: int
    state_dtype: torch.dtype
    batch: int = 100
    model_bytes: int = 0
    track_information: bool = False
    inplace: bool = True
    replacing: bool = False
    state_per_layer: int = 0
    master_per_layer: int = 0
    statistics_per_layer: int = 0
    edit_temporaries: int = 0
    build_temporaries: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def state(self) -> int:
        """The state kept between edits by all edited layers (C, gram0, W, W0, and G if tracked)."""
        return self.n_edit_layers * (self.state_per_layer + self.master_per_layer)

    @property
    def statistics(self) -> int:
        return self.n_edit_layers * self.statistics_per_layer

    @property
    def peak_edit(self) -> int:
        """Peak during an edit: the state plus the edit's temporaries (the model not included)."""
        return self.state + self.edit_temporaries

    @property
    def peak_prepare(self) -> int:
        """Peak while preparing: the float64 sums of the statistics pass, or later the float32
        moments of every layer + every state + the temporaries of one state's build."""
        moments = self.n_edit_layers * self.statistics_per_layer // 2
        return max(self.statistics, moments + self.state + self.build_temporaries)

    @property
    def peak(self) -> int:
        """The editor's peak (the larger of preparing and editing), the model not included."""
        return max(self.peak_edit, self.peak_prepare)

    @property
    def total_peak(self) -> int:
        """Peak with the model's own weights."""
        return self.peak + self.model_bytes

    def fits(self, capacity_bytes: float, *, reserve: float = 0.05) -> bool:
        """Whether the model and the editor's peak fit in ``capacity_bytes`` minus a ``reserve``
        share (CUDA context, allocator fragmentation, activations of short prompts)."""
        return self.total_peak <= (1.0 - reserve) * capacity_bytes

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("state C + gram0 (per layer)", self.state_per_layer),
            ("master W + W0 (per layer)", self.master_per_layer),
            ("state, all edited layers", self.state),
            ("statistics (float64, all layers)", self.statistics),
            ("edit temporaries", self.edit_temporaries),
            ("peak while preparing", self.peak_prepare),
            ("peak while editing", self.peak_edit),
            ("model weights", self.model_bytes),
            ("total peak with the model", self.total_peak),
        ]

    def table(self) -> str:
        """A two-column markdown table of the figures."""
        name = str(self.state_dtype).removeprefix("torch.")
        head = (f"d_model {self.d_model}, d_k {self.d_k}, {self.n_edit_layers} edited layer(s), "
                f"{name} state, batch {self.batch}{'' if self.inplace else ', pure update (not in place)'}"
                f"{', replacing earlier facts' if self.replacing else ''}\n\n")
        lines = ["| quantity | bytes |", "|---|---|"]
        lines += [f"| {what} | {format_bytes(n)} |" for what, n in self.rows()]
        return head + "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def plan(d_model: int, d_k: int, n_edit_layers: int = 5, state_dtype: torch.dtype | str = "float64", *,
         batch: int = 100, model_bytes: int = 0, track_information: bool = False, inplace: bool = True,
         replacing: bool = False) -> MemoryPlan:
    """The :class:`MemoryPlan` of an editor of ``n_edit_layers`` MLP down-projections of shape
    ``(d_k, d_model)`` with a ``state_dtype`` state, edits of ``batch`` facts, and a model whose
    weights take ``model_bytes``. ``inplace=True`` (default): the editor's in-place update;
    ``False``: the pure update. ``replacing``: the edit retracts earlier facts (one copy of ``C``
    per layer until it ends)."""
    for name, value in (("d_model", d_model), ("d_k", d_k), ("n_edit_layers", n_edit_layers), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise HyperparameterError(f"{name} must be an int >= 1; got {value!r}")
    if model_bytes < 0:
        raise HyperparameterError(f"model_bytes must be >= 0; got {model_bytes!r}")
    dtype = _dtype(state_dtype)
    if dtype not in (torch.float32, torch.float64):
        raise HyperparameterError(f"state dtype must be float32 or float64; got {dtype}")
    s = _DTYPE_BYTES[dtype]
    square, rect, thin = s * d_k * d_k, s * d_k * d_model, s * d_k * batch
    state = (3 if track_information else 2) * square
    master = 2 * rect
    if inplace:
        # until the batch is committed: the new W and the factor G of every layer (G also in the
        # undo log until the edit ends); F^T while one layer's step is computed; C written in place
        edit_tmp = n_edit_layers * (rect + thin) + thin
        if replacing:  # the exact-rollback copy of each layer's C
            edit_tmp += n_edit_layers * square
    else:
        # pending (C, W) of every layer until the batch is committed, plus the step's three
        # d_k^2 temporaries and F, gain (d_k, u) at the layer being computed
        edit_tmp = n_edit_layers * (square + rect) + 3 * square + 2 * thin + rect
    build_tmp = 5 * square
    return MemoryPlan(d_model=d_model, d_k=d_k, n_edit_layers=n_edit_layers, state_dtype=dtype, batch=batch,
                      model_bytes=int(model_bytes), track_information=track_information, inplace=inplace,
                      replacing=replacing,
                      state_per_layer=state, master_per_layer=master, statistics_per_layer=8 * d_k * d_k,
                      edit_temporaries=edit_tmp, build_temporaries=build_tmp)


def free_memory(device: torch.device | str) -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` for CUDA, else the host's available
    RAM (psutil, or ``MemAvailable`` in /proc/meminfo)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of the dev extras only
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the free memory of this host")  # pragma: no cover


def check_fits(plan: MemoryPlan, device: torch.device | str = "cpu", *, include_model: bool = False,
               reserve: float = 0.05, free_bytes: int | None = None) -> int:
    """Raise :class:`InsufficientMemoryError` when ``plan``'s peak cannot fit on ``device``.

    ``include_model=False`` (default) assumes the model is already loaded (its weights are not in
    the free figure); pass ``True`` to plan before loading it. ``reserve`` keeps that share of the
    free memory unused. ``free_bytes`` overrides the measured free memory. Returns the headroom
    in bytes.
    """
    free = free_memory(device) if free_bytes is None else int(free_bytes)
    need = plan.total_peak if include_model else plan.peak
    usable = int((1.0 - reserve) * free)
    if need > usable:
        dtype = str(plan.state_dtype).removeprefix("torch.")
        hint = ("; a float32 state halves it" if plan.state_dtype == torch.float64 else "")
        hint += "; fewer edited layers or the in-place update cut the temporaries" if not plan.inplace else ""
        hint += "; an edit that replaces no earlier fact needs no copy of C" if plan.replacing else ""
        raise InsufficientMemoryError(
            f"the edit state does not fit on {torch.device(device)}: it needs {format_bytes(need)} "
            f"(state {format_bytes(plan.state)} for {plan.n_edit_layers} layer(s) of d_k={plan.d_k} in "
            f"{dtype}, statistics {format_bytes(plan.statistics)}, peak temporaries "
            f"{format_bytes(max(plan.edit_temporaries, plan.build_temporaries))}"
            + (f", model {format_bytes(plan.model_bytes)}" if include_model else "")
            + f") but {format_bytes(free)} is free ({format_bytes(usable)} usable){hint}"
        )
    return usable - need


def memory_table(shapes: dict[str, dict] | None = None, *, n_edit_layers: int = 5, batch: int = 100,
                 gpus_gb: Sequence[float] = GPU_SIZES_GB, inplace: bool = True) -> str:
    """Markdown table: per model shape and state dtype, the state, master weights, statistics,
    peak of an edit, and which GPU sizes hold the model (bf16) plus the editor's peak."""
    shapes = MODEL_SHAPES if shapes is None else shapes
    gpu_cols = " | ".join(f"{g} GB" for g in gpus_gb)
    lines = [
        f"| model | d_model | d_k | state | C + gram0 / layer | W + W0 / layer | state, {n_edit_layers} layers "
        f"| statistics | peak (editor) | model bf16 | {gpu_cols} |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(gpus_gb),
    ]
    for name, shape in shapes.items():
        for dtype in ("float64", "float32"):
            model_bytes = int(2 * shape.get("params", 0))
            p = plan(shape["d_model"], shape["d_k"], n_edit_layers, dtype, batch=batch,
                     model_bytes=model_bytes, inplace=inplace)
            fits = " | ".join("yes" if p.fits(g * 1e9) else "no" for g in gpus_gb)
            lines.append(
                f"| {name} | {p.d_model} | {p.d_k} | {dtype} | {format_bytes(p.state_per_layer)} | "
                f"{format_bytes(p.master_per_layer)} | {format_bytes(p.state)} | {format_bytes(p.statistics)} | "
                f"{format_bytes(p.peak)} | {format_bytes(model_bytes)} | {fits} |"
            )
    return "\n".join(lines)
