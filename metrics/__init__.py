"""Evaluation metrics of the seed papers and the evaluation report.

- `image`: L1, SSIM, MS-SSIM (plain torch)          - `lpips`: LPIPS v0.1 (AlexNet / VGG16) in plain torch
- `clip`: CLIP-T, CLIP-R, CLIP-I, masked CLIP score  - `dino`: DINO image similarity
- `curves`: LUSD's success curves, CLIP-AUC, L1*, CLIP-I*
- `runs`: reading edit run folders                   - `evaluator`: all metrics over runs
- `report`: the self-contained HTML report           - `detector`: the toy world's classical scene detector
"""
