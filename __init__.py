"""dreamsteer: personalized text-to-image diffusion on PyTorch Lightning.

The repository root is this package: its folders (`train`, `lit_modules`, `data`, ...) install as
`dreamsteer.train`, `dreamsteer.lit_modules`, ... so they never collide with a user's own `data/` or `train.py`.
"""
__version__ = "0.1.0"
