"""K independent networks of one architecture trained as one vectorised model.

The networks around trajectory matching are small (a digits ConvNet has 20k
parameters, a CIFAR ConvNet-3 320k): one optimizer step of one of them is bound by
per-operation overhead (CPU) or kernel launches (GPU), not arithmetic. Stacking K
networks' parameters along a new leading *member* dimension and running them as one
model multiplies the work per operation by K, while every member keeps its own
initialisation, data order and augmentation.

:class:`StackedNetworks` holds the members' parameters as tensors ``[K, *shape]`` in
``named_parameters()`` order (so ``flat_members()[k]`` is exactly
``flatten_parameters(member k)``). Three backends compute the same function:

- ``"grouped"`` (ConvNet family: :class:`~lightning_distill.models.ConvNet` and its
  subclasses): the members' channels side by side, ``[B, K * C, H, W]``, one grouped
  convolution (``groups=K``) per block, instance / group / batch norm as one norm over
  ``K * C`` channels, the classifier as one ``baddbmm``. Contiguous (NCHW) memory by
  default: on the CPU, ``group_norm`` and its backward are ~15x slower on channels-last
  tensors, which made the whole step 1.3-1.7x slower (``benchmarks/HISTORY.md``,
  'Contiguous memory and matmul pooling for the grouped backend'). On
  2 CPU cores the fastest backend for the smallest steps (the digits experts and ipc 1
  sets, ``benchmarks/batched.py``).
- ``"vmap"`` (any ``build_model`` network): ``torch.func.stack_module_state`` +
  ``vmap(functional_call)``.
- ``"loop"`` (any network): each member's own network operations, one member after the
  other, on views of the stacked tensors. The arithmetic is that of K separate networks,
  bit for bit (the tests check equality in float32); what the group saves is the cost
  around the forward pass: one optimizer step, one augmentation call, one Lightning
  step for all members. On a CPU, where the grouped convolutions are slower per member
  than K dense ones once the maps are large, this is the faster way to run a group.

All three are exact per member: member k's output, loss and gradient are member k's alone
(they differ from a one-at-a-time network only by floating-point rounding, the tests
check 1e-10 relative in float64 after 20 steps; the loop's rounding is the one-at-a-time
network's own). Since SGD (momentum, weight decay) is
element-wise, ``torch.optim.SGD`` over the stacked parameters is per-member SGD; the
loss to minimise is the SUM of the members' losses (:func:`member_losses`), whose
gradient with respect to member k's parameters is member k's gradient.

Augmentation per member: :func:`augment_members` gives member k's batch the draws of
member k's generator, exactly as ``augment(x_k, generator=g_k)`` would.

Memory: :func:`estimate_group_memory` / :func:`check_group_memory` refuse a group that
would not fit, before any training, with the estimate and a smaller K.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ..errors import InputError
from ..models.convnet import ConvBlock, ConvNet
from ..models.params import ParamSpec

__all__ = [
    "BACKENDS",
    "CPU_GROUPED_MAX_IMAGE",
    "CPU_GROUPED_MAX_PIXELS",
    "GroupMemoryError",
    "StackedNetworks",
    "augment_members",
    "auto_backend",
    "check_group_memory",
    "chunks",
    "estimate_group_memory",
    "gather_members",
    "member_losses",
    "memory_budget",
]

BACKENDS = ("auto", "grouped", "vmap", "loop")

#: ``"auto"`` on a CPU runs the grouped backend only for images of at most this many
#: pixels (H x W) and member steps of at most :data:`CPU_GROUPED_MAX_PIXELS` (images x H x
#: W), the loop otherwise. Measured on 2 cores (benchmarks/HISTORY.md, "Contiguous
#: memory and matmul pooling for the grouped backend", groups of 8): at 8x8 grouped beats
#: the loop from the digits experts (batch 32, 3.3x against 1.9x one-at-a-time throughput) to digits
#: ipc 50 (batch 256: 16384 pixels, 1.4x against 1.2x); at 28x28 the loop wins from
#: Fashion-MNIST ipc 1 (7840 pixels: 1.05x against 0.75x) on.
CPU_GROUPED_MAX_IMAGE = 64
CPU_GROUPED_MAX_PIXELS = 16384


def auto_backend(grouped_ok: bool, device: torch.device | str, images: int,
                 image_pixels: int) -> str:
    """The backend ``"auto"`` runs a member's step of ``images`` images of ``image_pixels``
    (H x W) each with: on an accelerator ``"grouped"`` where supported, else ``"vmap"``
    (one launch per operation for all members); on a CPU ``"grouped"`` where supported,
    ``image_pixels`` is at most :data:`CPU_GROUPED_MAX_IMAGE` and the step at most
    :data:`CPU_GROUPED_MAX_PIXELS`, else ``"loop"``."""
    if torch.device(device).type != "cpu":
        return "grouped" if grouped_ok else "vmap"
    small = (image_pixels <= CPU_GROUPED_MAX_IMAGE
             and images * image_pixels <= CPU_GROUPED_MAX_PIXELS)
    return "grouped" if grouped_ok and small else "loop"


def _grouped_supported(net: nn.Module) -> bool:
    if not isinstance(net, ConvNet):
        return False
    for block in net.features:
        if not isinstance(block, ConvBlock):
            return False
        if not isinstance(block.norm, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm, nn.Identity)):
            return False
        if not isinstance(block.act, (nn.ReLU, nn.Sigmoid, nn.LeakyReLU)):
            return False
        if not isinstance(block.pool, (nn.AvgPool2d, nn.MaxPool2d, nn.Identity)):
            return False
    return True


class StackedNetworks(nn.Module):
    """K networks of one architecture with stacked parameters, run as one model.

    Args:
        nets: the members, all of the same architecture (the same ``ParamSpec``); their
            current parameters and buffers are copied (the modules are not kept).
        backend: ``"grouped"`` (ConvNet family only), ``"vmap"`` or ``"loop"`` (any
            network), or ``"auto"``: chosen at every forward pass by the device and the
            member's step size (:func:`auto_backend`).
        channels_last: run the grouped backend in channels-last memory format (default:
            off; on 2 CPU cores contiguous tensors are 1.3-1.7x faster for the whole
            step, because the norms are much slower on channels-last tensors).

    ``parameters()`` yields one tensor ``[K, *shape]`` per parameter of a member, in the
    member's ``named_parameters()`` order; buffers (BatchNorm running statistics) are
    stacked the same way.

    Example::

        nets = [seeded_model("ConvNet", 1, 10, 8, seed=s, width=32, depth=2) for s in seeds]
        group = StackedNetworks(nets)
        logits = group(x)                  # x [K, B, C, H, W] -> [K, B, classes]
        loss = member_losses(logits, y).sum()
    """

    def __init__(
        self, nets: Sequence[nn.Module], backend: str = "auto", channels_last: bool = False
    ) -> None:
        super().__init__()
        nets = list(nets)
        if not nets:
            raise InputError("StackedNetworks: need at least one network")
        if backend not in BACKENDS:
            raise InputError(f"StackedNetworks: backend must be one of {BACKENDS}, got {backend!r}")
        spec = ParamSpec.of(nets[0])
        for k, net in enumerate(nets[1:], 1):
            if ParamSpec.of(net) != spec or type(net) is not type(nets[0]):
                raise InputError(
                    f"StackedNetworks: member {k} ({type(net).__name__}) differs in "
                    f"architecture from member 0 ({type(nets[0]).__name__})"
                )
        grouped_ok = _grouped_supported(nets[0])
        if backend == "grouped" and not grouped_ok:
            raise InputError(
                f"StackedNetworks: backend 'grouped' supports the ConvNet family, got "
                f"{type(nets[0]).__name__}; use backend 'vmap'"
            )
        self.backend = backend
        self.grouped_ok = grouped_ok
        self.members = len(nets)
        self.spec = spec
        self.channels_last = bool(channels_last)
        modes = [net.training for net in nets]
        for net in nets:  # stack_module_state wants one mode; the members' modes are kept
            net.train()
        params, buffers = stack_module_state(nets)
        for net, mode in zip(nets, modes, strict=True):
            net.train(mode)
        self.param_names: tuple[str, ...] = tuple(params)
        self.buffer_names: tuple[str, ...] = tuple(buffers)
        self.stacked = nn.ParameterList(
            [nn.Parameter(params[n].detach().clone()) for n in self.param_names])
        for i, n in enumerate(self.buffer_names):
            self.register_buffer(f"buffer_{i}", buffers[n].detach().clone())
        # an architecture template without storage (the functional_call base / layer facts)
        template = copy.deepcopy(nets[0]).to("meta")
        object.__setattr__(self, "_template", template)
        self.model_config = dict(getattr(nets[0], "model_config", {}) or {})

    # ------------------------------------------------------------------ views
    def params_dict(self) -> dict[str, Tensor]:
        """``{member parameter name: stacked tensor [K, *shape]}``."""
        return dict(zip(self.param_names, self.stacked, strict=True))

    def buffers_dict(self) -> dict[str, Tensor]:
        return {n: getattr(self, f"buffer_{i}") for i, n in enumerate(self.buffer_names)}

    def flat_members(self) -> Tensor:
        """``[K, P]``: row k is member k's flat parameter vector (``named_parameters()``
        order, as :func:`~lightning_distill.models.flatten_parameters`)."""
        k = self.members
        return torch.cat([p.reshape(k, -1) for p in self.stacked], dim=1)

    def member(self, k: int) -> nn.Module:
        """A plain network holding member ``k``'s current parameters and buffers."""
        net = copy.deepcopy(self._template).to_empty(device=self.stacked[0].device)
        state = {n: p[k].detach().clone() for n, p in self.params_dict().items()}
        state.update({n: b[k].detach().clone() for n, b in self.buffers_dict().items()})
        net.load_state_dict(state, strict=True)
        net.train(self.training)
        return net

    # ------------------------------------------------------------------ forward
    def backend_for(self, batch: Tensor) -> str:
        """The backend that runs a member's ``batch [B, C, H, W]``: the one asked for, or
        for ``"auto"`` :func:`auto_backend` by its device, ``B`` and ``H x W``."""
        if self.backend != "auto":
            return self.backend
        return auto_backend(self.grouped_ok, batch.device, batch.shape[0],
                            math.prod(batch.shape[2:]))

    def forward(self, x: Tensor) -> Tensor:
        """Member k's logits on member k's batch: ``x [K, B, ...] -> [K, B, classes]``."""
        if x.shape[0] != self.members:
            raise InputError(
                f"StackedNetworks: input has {x.shape[0]} member batches, the group has "
                f"{self.members} members (use forward_shared for one batch seen by all)"
            )
        backend = self.backend_for(x[0])
        if backend == "grouped":
            k, b = x.shape[:2]
            return self._grouped(x.transpose(0, 1).reshape(b, -1, *x.shape[3:]))
        if backend == "loop":
            return self._looped(x.unbind(0))
        return self._vmapped(x, 0)

    def forward_shared(self, x: Tensor) -> Tensor:
        """Every member's logits on the same batch: ``x [B, ...] -> [K, B, classes]``."""
        backend = self.backend_for(x)
        if backend == "grouped":
            return self._grouped(x.repeat(1, self.members, 1, 1))
        if backend == "loop":
            return self._looped([x] * self.members)
        return self._vmapped(x, None)

    def _vmapped(self, x: Tensor, in_dim: int | None) -> Tensor:
        template = self._template
        template.train(self.training)

        def one(params: dict[str, Tensor], buffers: dict[str, Tensor], xb: Tensor) -> Tensor:
            return functional_call(template, (params, buffers), (xb,))

        return vmap(one, in_dims=(0, 0, in_dim), randomness="different")(
            self.params_dict(), self.buffers_dict(), x)

    def _looped(self, xs: Sequence[Tensor]) -> Tensor:
        """Member k's network on ``xs[k]``, one after the other: each member runs the
        operations of a network of its own on views of the stacked tensors (``unbind``,
        whose backward stacks the members' gradients in one operation)."""
        template = self._template
        template.train(self.training)
        params = {n: p.unbind(0) for n, p in self.params_dict().items()}
        buffers = {n: b.unbind(0) for n, b in self.buffers_dict().items()}
        return torch.stack([
            functional_call(template, ({n: v[k] for n, v in params.items()},
                                       {n: v[k] for n, v in buffers.items()}), (xk,))
            for k, xk in enumerate(xs)])

    def _grouped(self, h: Tensor) -> Tensor:
        """The ConvNet family on ``h [B, K * C, H, W]`` (members' channels side by side)."""
        k = self.members
        p = self.params_dict()
        bufs = self.buffers_dict()
        template: ConvNet = self._template  # type: ignore[assignment]
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        for d, block in enumerate(template.features):
            pre = f"features.{d}."
            w = p[pre + "conv.weight"]
            weight = w.reshape(-1, *w.shape[2:])
            if self.channels_last:
                weight = weight.contiguous(memory_format=torch.channels_last)
            bias = p[pre + "conv.bias"].reshape(-1) if pre + "conv.bias" in p else None
            h = F.conv2d(h, weight, bias, stride=block.conv.stride, padding=block.conv.padding,
                         groups=k)
            h = self._norm(block.norm, h, p, bufs, pre + "norm.")
            h = block.act(h)
            h = block.pool(h)
        b = h.shape[0]
        feats = h.reshape(b, k, -1).transpose(0, 1)  # [K, B, width * h * w], member order
        weight = p["classifier.weight"]  # [K, classes, F]
        return torch.baddbmm(p["classifier.bias"].unsqueeze(1), feats, weight.transpose(1, 2))

    def _norm(self, norm: nn.Module, h: Tensor, p: dict[str, Tensor], bufs: dict[str, Tensor],
              pre: str) -> Tensor:
        k = self.members
        if isinstance(norm, nn.Identity):
            return h
        weight = p.get(pre + "weight")
        bias = p.get(pre + "bias")
        if isinstance(norm, nn.GroupNorm):
            return F.group_norm(h, k * norm.num_groups,
                                None if weight is None else weight.reshape(-1),
                                None if bias is None else bias.reshape(-1), norm.eps)
        if isinstance(norm, nn.BatchNorm2d):
            mean, var = bufs.get(pre + "running_mean"), bufs.get(pre + "running_var")
            tracked = bufs.get(pre + "num_batches_tracked")
            use_batch = self.training or mean is None
            momentum = norm.momentum
            if self.training and tracked is not None:
                with torch.no_grad():
                    tracked.add_(1)
                if momentum is None:
                    raise NotImplementedError(
                        "StackedNetworks: BatchNorm with momentum=None (cumulative average) "
                        "is not supported by the grouped backend; use backend 'vmap'")
            return F.batch_norm(h, None if mean is None else mean.view(-1),
                                None if var is None else var.view(-1),
                                None if weight is None else weight.reshape(-1),
                                None if bias is None else bias.reshape(-1),
                                use_batch, 0.0 if momentum is None else momentum, norm.eps)
        # LayerNorm over a member's [C, H, W]
        b, _, hh, ww = h.shape
        hm = h.reshape(b, k, -1, hh, ww)
        out = F.layer_norm(hm, hm.shape[2:], None, None, norm.eps)
        if weight is not None:
            out = out * weight.unsqueeze(0)
        if bias is not None:
            out = out + bias.unsqueeze(0)
        return out.reshape(b, -1, hh, ww)


# ---------------------------------------------------------------------- losses and data
def member_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """``[K]``: member k's mean classification loss of ``logits[k]`` against ``labels[k]``.

    ``logits [K, B, classes]``; ``labels [K, B]`` class ids (cross-entropy) or
    ``[K, B, classes]`` logits (soft cross-entropy, DATM's soft labels, docs/method.md 'Soft
    labels and initialisation'), as
    :func:`~lightning_distill.functional.classification_loss` per member.
    """
    k, b, c = logits.shape
    if not labels.is_floating_point():
        per = F.cross_entropy(logits.reshape(k * b, c), labels.reshape(k * b).long(),
                              reduction="none")
        return per.view(k, b).mean(dim=1)
    if labels.shape != logits.shape:
        raise InputError(f"member_losses: soft labels {tuple(labels.shape)} must match the "
                         f"logits {tuple(logits.shape)}")
    log_p = F.log_softmax(logits, dim=2)
    q = F.softmax(labels.to(log_p.dtype), dim=2)
    return -(q * log_p).sum(dim=2).mean(dim=1)


def gather_members(data: Tensor, index: Tensor, shared: bool) -> Tensor:
    """Rows ``index[k]`` of member k's data: ``[K, b, ...]``.

    ``shared``: ``data [N, ...]`` is every member's; otherwise ``data [K, N, ...]``.
    """
    if shared:
        return data[index]
    k = index.shape[0]
    rows = torch.arange(k, device=index.device).unsqueeze(1)
    return data[rows, index]


def augment_members(augment: Any, x: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """Augment member k's batch ``x[k]`` with member k's generator: ``[K, B, C, H, W]``.

    Member k gets exactly the draws of ``augment(x[k], generator=generators[k])``. An
    augmenter with ``sample(x, generator)`` / ``apply(x, params)`` (DSA) samples per
    member, in member order, and applies each family once to the members that drew it
    (DSA's parameters are per sample, so this is the same arithmetic per image); any
    other callable is called once per member.
    """
    k = x.shape[0]
    if len(generators) != k:
        raise InputError(f"augment_members: {len(generators)} generators for {k} members")
    sample = getattr(augment, "sample", None)
    apply = getattr(augment, "apply", None)
    if sample is None or apply is None:
        return torch.stack([augment(x[i], generator=generators[i]) for i in range(k)])
    params = [sample(x[i], generators[i]) for i in range(k)]
    families: dict[str, list[int]] = {}
    for i, prm in enumerate(params):
        families.setdefault(prm.family, []).append(i)
    if len(families) == 1 and len(params[0].tensors) == 0:
        return x  # identity for every member
    out: list[Tensor | None] = [None] * k
    for members in families.values():
        first = params[members[0]]
        if len(members) == 1:
            out[members[0]] = apply(x[members[0]], first)
            continue
        merged = type(first)(first.family, {
            key: torch.cat([params[i].tensors[key] for i in members]) for key in first.tensors})
        idx = torch.tensor(members, device=x.device)
        y = apply(x.index_select(0, idx).flatten(0, 1), merged)
        for j, i in enumerate(members):
            out[i] = y[j * x.shape[1]:(j + 1) * x.shape[1]]
    return torch.stack(out)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- memory
class GroupMemoryError(InputError):
    """A group of networks would not fit in the device's memory (raised before training)."""


def memory_budget(device: torch.device | str) -> int:
    """Bytes a group may use on ``device``: 90% of the free CUDA memory, or 80% of the
    host's available memory (``MemAvailable``) for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(0.8 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(0.8 * pages * os.sysconf("SC_PAGE_SIZE")) if pages else 1 << 62


def _saved_bytes_per_sample(net: nn.Module, sample_shape: Sequence[int], dtype: torch.dtype
                            ) -> int:
    """Bytes autograd saves for the backward of one sample's forward + loss (measured
    with ``saved_tensors_hooks`` on a copy of ``net`` on the CPU, 2 samples / 2)."""
    probe = copy.deepcopy(net).to(device="cpu", dtype=dtype)
    probe.train()
    x = torch.zeros(2, *sample_shape, dtype=dtype)
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = probe(x)
        F.cross_entropy(out, torch.zeros(2, dtype=torch.long)).backward()
    params = {p.untyped_storage().data_ptr() for p in probe.parameters()}
    return math.ceil(sum(v for k, v in seen.items() if k not in params) / 2)


def estimate_group_memory(
    net: nn.Module, sample_shape: Sequence[int], batch_size: int, members: int,
    dtype: torch.dtype = torch.float32, states: int = 5,
) -> dict[str, int]:
    """Bytes a group of ``members`` copies of ``net`` needs to train at ``batch_size``.

    ``activations``: K x batch x the autograd-saved bytes of one sample's forward and
    loss (measured on a CPU probe; SAM / GSAM's second pass starts after the first
    backward has freed its graph, so the peak is one pass); ``parameters``: K x P x
    ``states`` tensors (weights, gradients, momentum, the sharpness-aware copy and
    perturbation). Returns ``{"activations", "parameters",
    "total", "per_member"}``.
    """
    per_sample = _saved_bytes_per_sample(net, sample_shape, dtype)
    item = torch.empty((), dtype=dtype).element_size()
    p = sum(t.numel() for t in net.parameters())
    per_member = batch_size * per_sample + states * p * item
    return {
        "activations": members * batch_size * per_sample,
        "parameters": members * states * p * item,
        "per_member": per_member,
        "total": members * per_member,
    }


def check_group_memory(
    net: nn.Module, sample_shape: Sequence[int], batch_size: int, members: int,
    device: torch.device | str, *, dtype: torch.dtype = torch.float32,
    budget: int | None = None, where: str = "group",
) -> dict[str, int]:
    """Raise :class:`GroupMemoryError` before training when a group of ``members`` would
    not fit in ``budget`` bytes (default :func:`memory_budget` of ``device``); the message
    gives the estimate and the largest K that fits. Returns the estimate."""
    est = estimate_group_memory(net, sample_shape, batch_size, members, dtype)
    limit = memory_budget(device) if budget is None else int(budget)
    if est["total"] > limit:
        fits = max(0, limit // max(1, est["per_member"]))
        hint = (f"use group_size {fits} (or less)" if fits >= 1 else
                "even one network does not fit: lower the batch size")
        raise GroupMemoryError(
            f"{where}: {members} networks at batch {batch_size} need about "
            f"{_mib(est['total'])} (activations {_mib(est['activations'])}, parameters and "
            f"optimizer state {_mib(est['parameters'])}) but {torch.device(device)} has "
            f"{_mib(limit)} to spare; {hint}"
        )
    return est


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` in consecutive groups of ``size`` (the last one shorter)."""
    if size < 1:
        raise InputError(f"group_size must be >= 1, got {size}")
    return [list(items[i:i + size]) for i in range(0, len(items), size)]

