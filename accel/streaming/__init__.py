"""Streaming inference for 1-D CNNs: ``accel.streaming.stream(model)`` turns an offline model on
``(B, C, L)`` signals into a :class:`StreamingModel` fed chunk by chunk. See docs/streaming.md."""
from accel.streaming.model import StreamingModel, StreamingTracer, stream

__all__ = ["stream", "StreamingModel", "StreamingTracer"]
