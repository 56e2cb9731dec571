"""The Difix network and its checkpoints.

- `difix`: the network (SD-Turbo's UNet and VAE run as one denoising step) and its named architectures;
- `attention`: reference-view conditioning, a diffusers attention processor over all views of a sample;
- `checkpoint`: `load_difix(spec)` and `save_pretrained` for every source (hub ids, folders, the
  reference release's checkpoint format, the embedded model);
- `ids`: where models come from, importable without diffusers;
- `pipeline`: the reference release's `DifixPipeline` call shape.
"""
