"""DINOv2's frozen-feature evaluation protocols (`evaluation.protocol: dinov2`): `protocol.py` runs
them; one module per task (classification, segmentation, depth), and what the heads read of the
backbone (`tokens.py`)."""
