"""Fine-tuning Difix.

- `finetune`: `difix3d train`, on (degraded render, clean target, reference) pairs;
- `losses`: the paper's loss, L2 + LPIPS + Gram on ImageNet VGG-16 features;
- `autoencoder`: pretraining the VAE of an architecture that has no pretrained weights.
"""
