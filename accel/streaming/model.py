"""``stream(model)``: trace a 1-D CNN with torch.fx and run its graph chunk by chunk.

Every tensor of the traced graph that depends on the input is a *stream*. Its static description
(:class:`_Info`) says where its time dimension is, how many input samples one of its samples spans
(``rate``), which offline sample its first stream sample is (``s0 <= 0``: the first ``-s0`` stream
samples are "junk", read before the offline signal starts, the delay), how many trailing offline
samples the stream never emits (``tail``: those that need the right zero padding) and its receptive
field. Temporal nodes (convolutions, pooling) zero the junk of their input (the offline left padding
is zeros) and, for a stride ``s``, prefix zeros so that their input starts on a window boundary; joins
(an op reading several streams) buffer each branch and align them on the offline sample index.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from accel.nn.dilated_conv import TCN, DilatedConv1d
from accel.nn.streaming_conv import StreamingConv1d, StreamingTCN
from accel.streaming.runtime import _Ctx, _Feed, _Join, _live_weight, _Pool, _Refresh

__all__ = ["stream", "StreamingModel", "StreamingTracer"]


class StreamingTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps convolutions (``nn.Conv1d`` and subclasses such as
    ``accel.nn.DilatedConv1d``), ``accel.nn.TCN`` (unless a layer's weight is parametrized), pooling,
    norms and activations as leaves (``torch.nn``'s built-in modules are leaves already); other user
    modules are traced into."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv1d, DilatedConv1d)):
            return True
        if isinstance(m, TCN) and all(_live_weight(c) is None for c in m.layers):
            return True  # streamed as one StreamingTCN (one native call per step for all its layers)
        return super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class _Info:
    td: int                 # index of the time dimension
    ndim: int
    s0: int = 0             # offline index of the first stream sample (<= 0)
    rate: int = 1           # input samples per sample
    rf: int = 1             # receptive field, input samples
    tail: Optional[int] = 0  # trailing offline samples never emitted by step (None: unknown)
    clock: Any = "input"    # streams with the same clock get equal per-step lengths


class _Refuse(Exception):
    pass


# ------------------------------------------------------------------ what is allowed

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.PReLU, nn.LeakyReLU, nn.ELU,
    nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Dropout,
)
_REFUSED_MODULES = {
    nn.AdaptiveAvgPool1d: "adaptive (global) pooling reduces over the whole time axis",
    nn.AdaptiveMaxPool1d: "adaptive (global) pooling reduces over the whole time axis",
    nn.GroupNorm: "GroupNorm normalizes over the time axis (its statistics need the whole signal)",
    nn.InstanceNorm1d: "InstanceNorm1d normalizes over the time axis (its statistics need the whole signal)",
    nn.LocalResponseNorm: "LocalResponseNorm is not supported",
}
_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.sqrt, torch.rsqrt, torch.exp, torch.log, torch.abs,
    torch.tanh, torch.sigmoid, torch.relu, torch.clamp,
    F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.leaky_relu, F.elu, F.softplus, F.hardtanh,
}
_POINTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "sqrt", "rsqrt", "exp", "log", "abs", "tanh", "sigmoid", "relu", "clamp",
    "neg", "contiguous",
}
_REDUCTIONS = {"mean", "sum", "var", "std", "amax", "amin"}  # methods and torch.<name>
_KEEPDIM_POS = {"mean": 2, "sum": 2, "amax": 2, "amin": 2, "var": 3, "std": 3}
_CAT = (torch.cat, torch.concat, torch.concatenate)


def _fn_name(target) -> str:
    name = getattr(target, "__name__", repr(target))
    for prefix, ns in (("torch", torch), ("torch.nn.functional", F), ("operator", operator)):
        if getattr(ns, name, None) is target:
            return f"{prefix}.{name}"
    mod = getattr(target, "__module__", None)
    return f"{mod}.{name}" if mod else name


def _where(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(root.get_submodule(node.target)).__name__})"
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()))[0] if stack else ""
    owner = f"module '{owner}'" if owner else "the top-level module"
    what = f"method .{node.target}()" if node.op == "call_method" else f"function {_fn_name(node.target)}"
    return f"{what} in {owner}"


# ------------------------------------------------------------------ the model

class StreamingModel(nn.Module):
    """A traced 1-D CNN run chunk by chunk; build it with :func:`stream`.

    ``reset(batch_size)`` starts new streams; ``step(chunk)`` takes ``(B, C, h)``, any ``h >= 1``, and
    returns the outputs that became due. Step output sample ``j`` (counted from the reset) equals offline
    output sample ``j - delay``; the first ``delay`` samples precede the offline output. ``stride`` is the
    number of input samples per output sample, ``receptive_field`` the input samples one output reads.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, info: Dict[fx.Node, _Info], runners, convs, all_convs,
                 states, out_node: fx.Node, ctx: _Ctx):
        super().__init__()
        self.root = root  # shares every parameter, not a copy
        self.convs = nn.ModuleDict(convs)  # StreamingConv1d sharing the offline convolutions' parameters
        self._all_convs = all_convs  # also those whose weight is recomputed each step (weight_norm)
        self._graph = graph
        self._info = info
        self._runners = runners
        self._states = states
        self._out = out_node
        out = info[out_node]
        self.delay, self.stride, self.receptive_field = -out.s0, out.rate, out.rf
        self._ctx = ctx
        self._batch = None
        self._empty = None
        self._ended = False

    def reset(self, batch_size: int = 1) -> None:
        for s in self._states:
            s.reset()
        for c in self._all_convs:
            c.reset(batch_size)
        self._batch = batch_size
        self._empty = None
        self._ended = False

    @torch.no_grad()
    def step(self, chunk: Tensor) -> Tensor:
        if chunk.dim() != 3:
            raise ValueError(f"StreamingModel.step: chunk must be (B, C, h), got shape {list(chunk.shape)}")
        if self._ended:
            raise RuntimeError("StreamingModel.step: the streams were flushed; call reset() to start new ones")
        if self._batch is None:
            self.reset(chunk.shape[0])
        elif chunk.shape[0] != self._batch:
            raise ValueError(f"StreamingModel.step: chunk has batch size {chunk.shape[0]}, the streams were reset "
                             f"for {self._batch}; call reset({chunk.shape[0]})")
        self._empty = chunk[..., :0]
        return self._run(chunk)

    def _run(self, chunk: Tensor) -> Tensor:
        env: Dict[fx.Node, Any] = {}
        for node in self._graph.nodes:
            if node.op == "placeholder":
                env[node] = chunk
            elif node.op == "output":
                return env[self._out]
            else:
                env[node] = self._runners[node](env)
        raise RuntimeError("graph without output")

    forward = step

    @torch.no_grad()
    def flush(self) -> Tensor:
        """End the streams: return the last outputs, those that read the offline model's right zero padding
        (a look-ahead convolution's last ``delay`` samples, a padded convolution's extra outputs). The step
        outputs since the reset, without their first ``delay`` samples and followed by these, are the offline
        output of the whole signal. Call :meth:`reset` before streaming again."""
        if self._empty is None or self._ended:
            raise RuntimeError("StreamingModel.flush: nothing was streamed since the last reset")
        chunk = self._empty  # an empty chunk with the last one's shape, dtype and device
        self._ctx.final = True
        try:
            return self._run(chunk)
        finally:
            self._ctx.final = False
            self._ended = True

    def extra_repr(self) -> str:
        return f"delay={self.delay}, stride={self.stride}, receptive_field={self.receptive_field}"


def _args_of(node: fx.Node) -> List[fx.Node]:
    return list(node.all_input_nodes)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class _Builder:
    def __init__(self, root: nn.Module, gm: fx.GraphModule):
        self.root, self.gm = root, gm
        self.info: Dict[fx.Node, _Info] = {}
        self.static: Dict[fx.Node, Any] = {}
        self.runners: Dict[fx.Node, Any] = {}
        self.convs: Dict[str, StreamingConv1d] = {}
        self.all_convs: List[StreamingConv1d] = []
        self.states: List[Any] = []
        self.ctx = _Ctx()

    # -- helpers
    def refuse(self, node, reason):
        raise ValueError(f"stream(): cannot stream {_where(node, self.root)}: {reason}")

    def is_stream(self, a) -> bool:
        return isinstance(a, fx.Node) and a in self.info

    def fn_of(self, node):
        if node.op == "call_module":
            return self.root.get_submodule(node.target)
        if node.op == "call_method":
            name = node.target
            return lambda obj, *a, **k: getattr(obj, name)(*a, **k)
        return node.target

    def static_runner(self, node):
        if node.op == "get_attr":
            names = node.target.split(".")

            def run(env):
                obj = self.root
                for n in names:
                    obj = getattr(obj, n)
                return obj
            return run
        fn = self.fn_of(node)

        def run(env):
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            return fn(*args, **kwargs)
        return run

    def apply_runner(self, node, fn, streams: List[fx.Node]):
        """Run ``fn`` on the node's arguments, the stream ones aligned by a join when needed."""
        infos = [self.info[s] for s in streams]
        join = None
        if len({(i.clock, i.s0) for i in infos}) > 1:
            join = _Join(infos)
            self.states.append(join)

        def run(env):
            vals = None
            if join is not None:
                vals = dict(zip(streams, join.push([env[s] for s in streams])))
            get = (lambda a: vals[a] if a in vals else env[a]) if vals else (lambda a: env[a])
            return fn(*fx.node.map_arg(node.args, get), **fx.node.map_arg(node.kwargs, get))
        return run

    def joined(self, node, streams: List[fx.Node], td: int, ndim: int) -> _Info:
        infos = [self.info[s] for s in streams]
        if len({i.rate for i in infos}) > 1:
            self.refuse(node, f"it joins streams at different rates ({sorted({i.rate for i in infos})} input "
                              f"samples per sample); they cannot be aligned sample by sample")
        same = len({(i.clock, i.s0) for i in infos}) == 1
        tails = [i.tail for i in infos]
        return _Info(td=td, ndim=ndim, s0=min(i.s0 for i in infos), rate=infos[0].rate,
                     rf=max(i.rf for i in infos), tail=None if None in tails else max(tails),
                     clock=infos[0].clock if same else object())

    def broadcast(self, node, streams: List[fx.Node]) -> _Info:
        """Elementwise op: streams and static tensors broadcast; the time dims must line up and no static
        tensor may extend along time."""
        tensors = [a for a in _args_of(node) if not self.is_stream(a) and isinstance(self.static.get(a), Tensor)]
        consts = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, Tensor)]
        nd = max([self.info[s].ndim for s in streams] + [self.static[a].dim() for a in tensors]
                 + [c.dim() for c in consts])
        tds = {self.info[s].td + nd - self.info[s].ndim for s in streams}
        if len(tds) > 1:
            self.refuse(node, "its stream operands have their time dimension at different positions")
        td = tds.pop()
        for t in [self.static[a] for a in tensors] + consts:
            pos = td - (nd - t.dim())
            if pos >= 0 and t.shape[pos] != 1:
                self.refuse(node, f"a constant operand of shape {list(t.shape)} extends along the time dimension")
        return self.joined(node, streams, td, nd)

    # -- node kinds
    def build(self) -> StreamingModel:
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(f"stream(): the model's forward must take exactly one input (B, C, L), got "
                             f"{[p.target for p in placeholders]}")
        out_node = None
        for node in graph.nodes:
            if node.op == "placeholder":
                self.info[node] = _Info(td=2, ndim=3)
            elif node.op == "output":
                out_node = node.args[0]
                if not self.is_stream(out_node):
                    raise ValueError("stream(): the model's output must be one tensor computed from the input "
                                     "(tuples and constant outputs are not supported)")
            elif not any(self.is_stream(a) for a in _args_of(node)):
                run = self.static_runner(node)
                self.runners[node] = run
                try:
                    self.static[node] = run(self.static)
                except Exception as e:  # noqa: BLE001
                    self.refuse(node, f"evaluating it without the input failed ({e})")
            else:
                self.stream_node(node)
        return StreamingModel(self.root, graph, self.info, self.runners, self.convs, self.all_convs, self.states,
                              out_node, self.ctx)

    def stream_node(self, node: fx.Node) -> None:
        streams = [a for a in _args_of(node) if self.is_stream(a)]
        if node.op == "call_module":
            m = self.root.get_submodule(node.target)
            if isinstance(m, nn.Conv1d):
                return self.conv(node, m, streams)
            if isinstance(m, TCN):
                return self.tcn(node, m)
            return self.module(node, m, streams)
        if node.op == "get_attr":
            self.refuse(node, "unexpected attribute access on a stream")
        target = node.target
        name = target if node.op == "call_method" else getattr(target, "__name__", "")
        is_fn = node.op == "call_function"
        if (is_fn and target in _POINTWISE_FUNCTIONS) or (not is_fn and target in _POINTWISE_METHODS):
            return self.pointwise(node, streams)
        if is_fn and target is F.dropout:
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            if training:
                self.refuse(node, "dropout in training mode is random; call model.eval() first")
            return self.pointwise(node, streams)
        if (is_fn and target in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.glu)) or \
                (not is_fn and target in ("softmax", "log_softmax")):
            return self.along_dim(node, streams, default=-1 if target is F.glu else None)
        if (is_fn and target in {getattr(torch, r) for r in _REDUCTIONS}) or (not is_fn and target in _REDUCTIONS):
            return self.reduction(node, streams, name)
        if is_fn and target is F.layer_norm:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
            return self.layer_norm(node, streams, shape)
        if is_fn and target is F.prelu:  # its weight runs along dim 1, not by broadcasting
            info = self.single(node, streams)
            if info.td == 1:
                self.refuse(node, "prelu's channel dimension (1) is time here")
            self.info[node] = info
            self.runners[node] = self.apply_runner(node, target, streams)
            return
        if (is_fn and target is torch.transpose) or (not is_fn and target in ("transpose", "permute", "unsqueeze",
                                                                              "squeeze")):
            return self.layout(node, streams, "transpose" if is_fn else target)
        if is_fn and target is operator.getitem:
            return self.getitem(node, streams)
        if is_fn and target in _CAT:
            return self.cat(node, streams)
        if not is_fn and target in ("size", "dim") or is_fn and target is getattr:
            self.refuse(node, "reading a stream's shape (its time length is the chunk's, not the signal's) "
                              "is not supported")
        self.refuse(node, "this operation is not in stream()'s list of supported ops (it may act along the "
                          "time axis, which a stream cannot do exactly)")

    def pointwise(self, node, streams):
        self.info[node] = self.broadcast(node, streams)
        self.runners[node] = self.apply_runner(node, self.fn_of(node), streams)

    def single(self, node, streams) -> _Info:
        if len(streams) != 1 or node.args[0] is not streams[0]:
            self.refuse(node, "expected the stream as its only tensor input")
        return self.info[streams[0]]

    def along_dim(self, node, streams, default=None):
        info = self.single(node, streams)
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else default)
        if dim is None or _norm_dim(dim, info.ndim) == info.td:
            self.refuse(node, "it acts along the time dimension")
        self.info[node] = info
        self.runners[node] = self.apply_runner(node, self.fn_of(node), streams)

    def reduction(self, node, streams, name):
        info = self.single(node, streams)
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dim is None:
            self.refuse(node, f"{name}() over all dimensions reduces over time")
        dims = [_norm_dim(d, info.ndim) for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
        if info.td in dims:
            self.refuse(node, f"{name}() over dim {dim} reduces over the time dimension")
        pos = _KEEPDIM_POS[name]
        keepdim = node.kwargs.get("keepdim", node.args[pos] if len(node.args) > pos else False)
        td, nd = info.td, info.ndim
        if not keepdim:
            td -= sum(d < info.td for d in dims)
            nd -= len(set(dims))
        self.info[node] = replace(info, td=td, ndim=nd)
        self.runners[node] = self.apply_runner(node, self.fn_of(node), streams)

    def layer_norm(self, node, streams, shape):
        info = self.single(node, streams)
        k = 1 if isinstance(shape, int) else len(shape)
        if info.td >= info.ndim - k:
            self.refuse(node, "the layer norm normalizes over the time dimension (transpose time away from the "
                              "last dimensions first)")
        self.info[node] = info
        self.runners[node] = self.apply_runner(node, self.fn_of(node), streams)

    def layout(self, node, streams, kind):
        info = self.single(node, streams)
        td, nd = info.td, info.ndim
        args = node.args[1:]
        if kind == "transpose":
            a, b = (_norm_dim(d, nd) for d in (list(args) + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2])
            td = b if td == a else a if td == b else td
        elif kind == "permute":
            perm = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            if not perm:
                perm = node.kwargs.get("dims")
            td = [_norm_dim(d, nd) for d in perm].index(td)
        elif kind == "unsqueeze":
            d = args[0] if args else node.kwargs["dim"]
            d = _norm_dim(d, nd + 1)
            td, nd = td + (d <= td), nd + 1
        else:  # squeeze
            if not args and "dim" not in node.kwargs:
                self.refuse(node, "squeeze() without a dim would squeeze the time dimension of a 1-sample chunk")
            d = _norm_dim(args[0] if args else node.kwargs["dim"], nd)
            if d == td:
                self.refuse(node, "it squeezes the time dimension")
            td, nd = td - (d < td), nd - 1
        self.info[node] = replace(info, td=td, ndim=nd)
        self.runners[node] = self.apply_runner(node, self.fn_of(node), streams)

    def getitem(self, node, streams):
        info = self.single(node, streams)
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, (fx.Node, Tensor, list)) for i in idx):
            self.refuse(node, "indexing a stream with tensors or lists is not supported")
        consuming = sum(1 for i in idx if i is not None and i is not Ellipsis)
        dims_in, out_dim, td_out, time_index = 0, 0, None, None
        for i in idx:
            if i is None:
                out_dim += 1
                continue
            span = info.ndim - consuming if i is Ellipsis else 1
            for _ in range(span):
                if dims_in == info.td:
                    time_index = slice(None) if i is Ellipsis else i
                    td_out = out_dim
                if isinstance(i, slice) or i is Ellipsis:
                    out_dim += 1
                dims_in += 1
        if time_index is None:  # time dim not named: kept whole, after the indexed dims
            time_index = slice(None)
            td_out = out_dim + (info.td - dims_in)
        nd = out_dim + (info.ndim - dims_in)
        if isinstance(time_index, int):
            self.refuse(node, "it indexes a single time step")
        out = replace(info, td=td_out, ndim=nd)
        chomp = 0
        if time_index != slice(None):
            s = time_index
            p = -s.stop if isinstance(s.stop, int) else 0
            if s.start not in (None, 0) or s.step not in (None, 1) or p <= 0:
                self.refuse(node, f"it slices the time dimension ({s}); only dropping the last p samples of a "
                                  f"convolution padded by p on the right (pad-then-chomp) is supported")
            if info.tail is None or info.tail < p:
                self.refuse(node, f"it drops the last {p} time samples, but only {info.tail} trailing samples of "
                                  f"its input come from right padding (pad-then-chomp needs a Conv1d with "
                                  f"padding=(K-1)*dilation before it)")
            out, chomp = replace(out, tail=info.tail - p), p
            # the stream never emits the right-padding samples: on a stream the chomp keeps everything
            idx = tuple(slice(None) if j is time_index else j for j in idx)
        self.info[node] = out
        src, ctx, td = streams[0], self.ctx, out.td
        trivial = all(j == slice(None) or j is Ellipsis for j in idx)

        def run(env):
            v = env[src] if trivial else env[src][idx]
            if chomp and ctx.final:  # flush: the right-padding samples arrive now, drop the last `chomp`
                n = v.shape[td]
                if n < chomp:
                    raise RuntimeError(f"StreamingModel.flush: {_where(node, self.root)} expected at least "
                                       f"{chomp} final samples to drop, got {n}")
                v = v.narrow(td, 0, n - chomp)
            return v
        self.runners[node] = run

    def cat(self, node, streams):
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if not all(self.is_stream(t) for t in tensors):
            self.refuse(node, "it concatenates a stream with a constant")
        infos = [self.info[t] for t in tensors]
        if len({(i.td, i.ndim) for i in infos}) > 1:
            self.refuse(node, "its operands have their time dimension at different positions")
        if _norm_dim(dim, infos[0].ndim) == infos[0].td:
            self.refuse(node, "it concatenates along the time dimension")
        self.info[node] = self.joined(node, list(tensors), infos[0].td, infos[0].ndim)
        self.runners[node] = self.apply_runner(node, self.fn_of(node), list(dict.fromkeys(tensors)))

    def module(self, node, m, streams):
        for cls, why in _REFUSED_MODULES.items():
            if isinstance(m, cls):
                self.refuse(node, why)
        info = self.single(node, streams) if streams else None
        if len(node.args) != 1 or node.kwargs:
            self.refuse(node, "expected one input and no keyword arguments")
        if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)):
            return self.pool(node, m, info)
        if isinstance(m, nn.BatchNorm1d):
            if m.training:
                self.refuse(node, "BatchNorm1d in training mode normalizes with the batch statistics over time; "
                                  "call model.eval() first")
            if m.running_mean is None:
                self.refuse(node, "BatchNorm1d without running statistics normalizes over time")
            if info.ndim != 3 or info.td != 2:
                self.refuse(node, "BatchNorm1d needs a (B, C, L) stream")
        elif isinstance(m, nn.LayerNorm):
            return self.layer_norm(node, streams, m.normalized_shape)
        elif isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.GLU)):
            if m.dim is None or _norm_dim(m.dim, info.ndim) == info.td:
                self.refuse(node, "it acts along the time dimension")
        elif isinstance(m, nn.Linear):
            if info.td == info.ndim - 1:
                self.refuse(node, "Linear acts on the last dimension, which is time here")
        elif isinstance(m, _POINTWISE_MODULES):
            if isinstance(m, nn.Dropout) and m.training and m.p > 0:
                self.refuse(node, "Dropout in training mode is random; call model.eval() first")
            if isinstance(m, nn.PReLU) and m.num_parameters > 1 and info.td == 1:
                self.refuse(node, "PReLU's channel dimension (1) is time here")
        else:
            self.refuse(node, f"{type(m).__name__} is not a module stream() supports")
        self.info[node] = info
        self.runners[node] = self.apply_runner(node, m, streams)

    def temporal_input(self, node, info: _Info, s: int) -> _Feed:
        if info.ndim != 3 or info.td != 2:
            self.refuse(node, "expected a (B, C, L) stream, time last")
        prefix = info.s0 % s
        feed = _Feed(prefix, -(info.s0 - prefix))
        self.states.append(feed)
        return feed

    def pool(self, node, m, info):
        k, s, p = m.kernel_size, m.stride, m.padding
        k, s, p = [v[0] if isinstance(v, (tuple, list)) else v for v in (k, s, p)]
        dil = getattr(m, "dilation", 1)
        dil = dil[0] if isinstance(dil, (tuple, list)) else dil
        if k != s or p != 0 or dil != 1 or m.ceil_mode or getattr(m, "return_indices", False):
            self.refuse(node, f"pooling is streamed with kernel_size == stride, no padding, dilation 1, "
                              f"ceil_mode=False only (got kernel_size={k}, stride={s}, padding={p})")
        feed = self.temporal_input(node, info, s)
        pool = _Pool(m, k)
        self.states.append(pool)
        s0 = (info.s0 - feed.prefix) // s
        self.info[node] = _Info(td=2, ndim=3, s0=s0, rate=info.rate * s, rf=info.rf + (k - 1) * info.rate,
                                tail=None, clock=object())
        src = node.args[0]
        self.runners[node] = lambda env: pool(feed(env[src]))

    def conv(self, node, m, streams):
        x = node.args[0] if node.args else node.kwargs.get("input")
        residual = node.kwargs.get("residual", node.args[1] if len(node.args) > 1 else None)
        extra = set(node.kwargs) - {"residual", "input"}
        if not self.is_stream(x) or extra or len(node.args) > 2:
            self.refuse(node, "expected the stream as the convolution's input")
        live = _live_weight(m)
        try:
            if live is None:
                sc = StreamingConv1d.from_module(m)
            else:  # weight recomputed from its parametrization (weight_norm) before every step
                w = live()
                sc = StreamingConv1d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                                     dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                                     padding_mode=m.padding_mode, device="meta", dtype=w.dtype,
                                     activation=getattr(m, "activation", None))
                sc.bias = m.bias
                sc._parameters["weight"] = w
        except (ValueError, TypeError) as e:
            self.refuse(node, str(e))
        info = self.info[x]
        feed = self.temporal_input(node, info, sc.stride)
        if live is None:
            self.convs[node.name] = sc
        else:
            self.states.append(_Refresh(sc, live))
        self.all_convs.append(sc)
        s0 = (info.s0 - feed.prefix) // sc.stride - sc.delay
        tail = info.tail + sc.right_padding if sc.stride == 1 and info.tail is not None else None
        out = _Info(td=2, ndim=3, s0=s0, rate=info.rate * sc.stride, rf=info.rf + sc.span * info.rate, tail=tail,
                    clock=object())

        ctx = self.ctx

        def run_conv(env):
            if live is not None:
                sc._parameters["weight"] = live()
            y = sc.step(feed(env[x]))
            if ctx.final:  # end of the stream: the outputs that read the right zero padding
                y = torch.cat([y, sc.flush()], -1)
            return y
        if residual is None:
            self.info[node] = out
            self.runners[node] = run_conv
            return
        if not self.is_stream(residual):
            self.refuse(node, "a constant residual is not supported")
        rinfo = self.info[residual]
        if (rinfo.td, rinfo.ndim) != (2, 3):
            self.refuse(node, "the residual must be a (B, C, L) stream")
        conv_info = out
        self.info[node] = out = self._join_infos(node, [conv_info, rinfo])
        if (conv_info.clock, conv_info.s0) == (rinfo.clock, rinfo.s0):
            self.runners[node] = lambda env: run_conv(env) + env[residual]
            return
        join = _Join([conv_info, rinfo])
        self.states.append(join)

        def run(env):
            y, r = join.push([run_conv(env), env[residual]])
            return y + r
        self.runners[node] = run

    def tcn(self, node, m: TCN):
        """An ``accel.nn.TCN`` (causal, stride 1, delay 0) as one :class:`StreamingTCN`."""
        x = node.args[0] if node.args else node.kwargs.get("x")
        if not self.is_stream(x) or len(node.args) > 1 or set(node.kwargs) - {"x"}:
            self.refuse(node, "expected the stream as the TCN's input")
        st = StreamingTCN(m)
        info = self.info[x]
        feed = self.temporal_input(node, info, 1)
        self.convs[node.name] = st
        self.all_convs.append(st)
        self.info[node] = _Info(td=2, ndim=3, s0=info.s0 - feed.prefix, rate=info.rate,
                                rf=info.rf + (m.receptive_field - 1) * info.rate, tail=info.tail, clock=object())
        self.runners[node] = lambda env: st.step(feed(env[x]))

    def _join_infos(self, node, infos):
        if len({i.rate for i in infos}) > 1:
            self.refuse(node, "its residual has a different rate than the convolution's output")
        tails = [i.tail for i in infos]
        return _Info(td=2, ndim=3, s0=min(i.s0 for i in infos), rate=infos[0].rate, rf=max(i.rf for i in infos),
                     tail=None if None in tails else max(tails), clock=object())


class _Holder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def stream(model: nn.Module) -> StreamingModel:
    """Convert an offline 1-D CNN on ``(B, C, L)`` inputs into a :class:`StreamingModel`.

    The model is traced with :class:`StreamingTracer` (torch.fx); it is not modified, and the streaming
    model shares its parameters. Anything that cannot be streamed exactly raises ``ValueError`` naming the
    module (qualified name) and the reason. See docs/streaming.md for what is supported.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"stream() expects an nn.Module, got {type(model).__name__}")
    tracer = StreamingTracer()
    if tracer.is_leaf_module(model, ""):  # the root is traced into: hold a leaf (an accel.nn.TCN) one level down
        model = _Holder(model)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise ValueError(f"stream(): cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
                         f"data-dependent control flow on the input is not supported") from e
    gm = fx.GraphModule(model, graph)
    return _Builder(model, gm).build()
