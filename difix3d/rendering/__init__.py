"""Rendering Gaussians: the rasterizer (gsplat's CUDA kernels on CUDA, pure PyTorch elsewhere) and a
plain 3D Gaussian Splatting fitter built on it."""
