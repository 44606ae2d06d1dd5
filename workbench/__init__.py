"""The CLI and the end-to-end flows: models, data, training, tuning, the demo."""

from kernels import runtime  # noqa: F401  first: Triton must see TRITON_INTERPRET before it is imported
