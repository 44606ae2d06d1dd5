"""The CLI and the end-to-end flows: models, data, training, tuning, the demo."""

