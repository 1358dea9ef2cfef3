"""Streaming inference for 1-D CNNs: ``accel.streaming.stream(model)`` turns an offline model on
``(B, C, L)`` signals into a :class:`StreamingModel` fed chunk by chunk; ``sliding_windows(model, window,
hop)`` runs per-window inference on overlapping windows by streaming. See docs/streaming.md."""
from accel.streaming.model import StreamingModel, StreamingTracer, stream
from accel.streaming.windows import SlidingWindows, WindowDeviation, nrmse, sliding_windows

__all__ = ["stream", "StreamingModel", "StreamingTracer", "sliding_windows", "SlidingWindows", "WindowDeviation",
           "nrmse"]
