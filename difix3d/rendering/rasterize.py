"""Gaussian splat rasterization: gsplat's CUDA kernels for CUDA tensors, pure PyTorch otherwise.

`rasterization()` takes gsplat 1.4's `gsplat.rendering.rasterization` arguments and returns the same
`(render_colors, render_alphas, info)`. CUDA tensors go to gsplat unchanged. Anything else takes a
differentiable PyTorch path that reproduces gsplat's conventions:

* projection: EWA splatting with gsplat's clamp of the Jacobian to 1.3x the field of view, `eps2d`
  added to the 2D covariance, near/far culling, a 3-sigma integer radius, off-screen culling;
* compositing: 16x16 tiles decide which Gaussians a pixel may see (as in gsplat's tile binning),
  front to back by depth, alpha = min(0.999, opacity * exp(-sigma)), contributions with
  alpha < 1/255 skipped, and a pixel stops at the Gaussian that would take its transmittance to
  1e-4 or below (that Gaussian is not added).

The CPU compositor works on the sparse list of (Gaussian, pixel) pairs that can contribute: each
Gaussian is expanded row by row over the exact ellipse where its alpha reaches 1/255, the pairs are
grouped by pixel with a stable counting sort (so depth order survives), and transmittance is an
exclusive segmented cumulative sum of log(1 - alpha). The cost therefore grows with the number of
Gaussian-pixel overlaps, not with Gaussians x pixels. A hand-written backward pass (`_Composite`)
avoids autograd's per-op bookkeeping on these long pair lists; it also fills `means2d.absgrad`
(per Gaussian, the sum over pixels of the absolute per-pixel gradient) as gsplat does.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from torch import Tensor

from difix3d.errors import Difix3DError

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")

# gsplat's compositing constants (rasterize_to_pixels_fwd.cu).
ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
TRANSMITTANCE_MIN = 1e-4
# Outward slack, in pixels, on the analytic ellipse bounds; the exact alpha test then decides.
_BOUND_SLACK = 1e-3

# Real spherical-harmonics constants (the 3DGS / gsplat basis and sign convention).
_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def rasterization(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = True,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    render_mode: str = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: str = "classic",
    channel_chunk: int = 32,
    distributed: bool = False,
    camera_model: str = "pinhole",
    covars: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """Render N Gaussians into C cameras; gsplat 1.4's `rasterization()` signature and outputs.

    Args follow gsplat: means [N, 3], quats [N, 4] (wxyz, any norm), scales [N, 3], opacities [N],
    colors [(C,) N, D] post-activation or [(C,) N, K, 3] SH coefficients when `sh_degree` is set,
    viewmats [C, 4, 4] world-to-camera, Ks [C, 3, 3], backgrounds [C, D], covars [N, 3, 3]
    (replaces quats and scales when given).

    Returns:
        render_colors [C, H, W, X] (X = D, 1 or D + 1 by `render_mode`), render_alphas [C, H, W, 1],
        and the `info` dict that gsplat's strategies read: means2d (in the autograd graph; after
        backward it carries `.absgrad` when `absgrad=True`), radii, depths, conics, opacities,
        camera_ids / gaussian_ids (packed only, else None), width, height, n_cameras, tile_size,
        tile_width, tile_height, tiles_per_gauss.

    CUDA tensors are rendered by gsplat itself. On other devices `packed`, `sparse_grad` and
    `channel_chunk` only shape memory use on the GPU and are accepted without effect, except that
    `packed` selects the layout of `info` exactly as in gsplat.
    """
    if means.is_cuda:
        from gsplat.rendering import rasterization as gsplat_rasterization

        return gsplat_rasterization(
            means=means,
            quats=quats,
            scales=scales,
            opacities=opacities,
            colors=colors,
            viewmats=viewmats,
            Ks=Ks,
            width=width,
            height=height,
            near_plane=near_plane,
            far_plane=far_plane,
            radius_clip=radius_clip,
            eps2d=eps2d,
            sh_degree=sh_degree,
            packed=packed,
            tile_size=tile_size,
            backgrounds=backgrounds,
            render_mode=render_mode,
            sparse_grad=sparse_grad,
            absgrad=absgrad,
            rasterize_mode=rasterize_mode,
            channel_chunk=channel_chunk,
            distributed=distributed,
            camera_model=camera_model,
            covars=covars,
        )
    return rasterization_torch(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
        far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d, sh_degree=sh_degree, packed=packed,
        tile_size=tile_size, backgrounds=backgrounds, render_mode=render_mode, absgrad=absgrad,
        rasterize_mode=rasterize_mode, camera_model=camera_model, covars=covars, distributed=distributed,
    )


def rasterization_torch(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = True,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    render_mode: str = "RGB",
    absgrad: bool = False,
    rasterize_mode: str = "classic",
    camera_model: str = "pinhole",
    covars: Optional[Tensor] = None,
    distributed: bool = False,
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """The pure-PyTorch renderer behind `rasterization()` for non-CUDA tensors (same arguments).

    Never touches gsplat; callable directly to compare against gsplat or to force the PyTorch path.
    """
    _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
                  backgrounds, render_mode, rasterize_mode, distributed, camera_model, covars, tile_size)

    n_cameras = viewmats.shape[0]
    factors = _covariance_factor(quats, scales, covars)
    radii, means2d, depths, conics, compensations = _project(
        means, factors, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip
    )
    opacities = opacities.expand(n_cameras, -1)
    if rasterize_mode == "antialiased":
        opacities = opacities * compensations

    colors = _camera_colors(means, colors, viewmats, sh_degree)  # [C, N, D]
    if render_mode in ("RGB+D", "RGB+ED"):
        colors = torch.cat([colors, depths[..., None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(n_cameras, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        colors = depths[..., None]
        if backgrounds is not None:
            backgrounds = backgrounds.new_zeros(n_cameras, 1)

    n_gaussians = means.shape[0]
    if packed:
        camera_ids, gaussian_ids = torch.nonzero(radii > 0, as_tuple=True)
        radii, means2d, depths, conics, opacities, colors = (
            t[camera_ids, gaussian_ids] for t in (radii, means2d, depths, conics, opacities, colors)
        )
        row_cameras = camera_ids
    else:
        camera_ids = gaussian_ids = None
        row_cameras = torch.arange(n_cameras, device=means.device).repeat_interleave(n_gaussians)

    tile_width = math.ceil(width / tile_size)
    tile_height = math.ceil(height / tile_size)
    x_tiles, y_tiles = _tile_ranges(means2d.detach(), radii, tile_size, tile_width, tile_height)
    tiles_per_gauss = ((x_tiles[1] - x_tiles[0]) * (y_tiles[1] - y_tiles[0])).to(torch.int32)

    geometry = _FrameGeometry(width, height, n_cameras, tile_size, row_cameras, absgrad)
    render_colors, render_alphas = _Composite.apply(
        means2d, conics, opacities, colors, backgrounds, radii, depths.detach(), geometry
    )
    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], dim=-1
        )
    info = {
        "camera_ids": camera_ids,
        "gaussian_ids": gaussian_ids,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opacities,
        "tile_width": tile_width,
        "tile_height": tile_height,
        "tiles_per_gauss": tiles_per_gauss,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": n_cameras,
    }
    return render_colors, render_alphas, info


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
                  backgrounds, render_mode, rasterize_mode, distributed, camera_model, covars, tile_size):
    """Raise Difix3DError for inputs the PyTorch path cannot render (gsplat asserts the same)."""
    n = means.shape[0] if means.dim() == 2 else -1
    c = viewmats.shape[0] if viewmats.dim() == 3 else -1
    if means.shape != (n, 3):
        raise Difix3DError(f"means must be [N, 3], got {list(means.shape)}")
    if covars is None and (quats.shape != (n, 4) or scales.shape != (n, 3)):
        raise Difix3DError(f"quats/scales must be [N, 4]/[N, 3], got {list(quats.shape)}/{list(scales.shape)}")
    if covars is not None and covars.shape != (n, 3, 3):
        raise Difix3DError(f"covars must be [N, 3, 3], got {list(covars.shape)}")
    if opacities.shape != (n,):
        raise Difix3DError(f"opacities must be [N], got {list(opacities.shape)}")
    if viewmats.shape != (c, 4, 4) or Ks.shape != (c, 3, 3):
        raise Difix3DError(f"viewmats/Ks must be [C, 4, 4]/[C, 3, 3], got {list(viewmats.shape)}/{list(Ks.shape)}")
    if width <= 0 or height <= 0 or tile_size <= 0:
        raise Difix3DError(f"width, height and tile_size must be positive, got {width}, {height}, {tile_size}")
    if render_mode not in RENDER_MODES:
        raise Difix3DError(f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    if rasterize_mode not in RASTERIZE_MODES:
        raise Difix3DError(f"rasterize_mode must be one of {RASTERIZE_MODES}, got {rasterize_mode!r}")
    if camera_model != "pinhole":
        raise Difix3DError(f"the CPU rasterizer supports camera_model='pinhole' only, got {camera_model!r}")
    if distributed:
        raise Difix3DError("distributed rasterization needs CUDA tensors")
    if sh_degree is None:
        if colors.shape[:-1] not in ((n,), (c, n)):
            raise Difix3DError(f"colors must be [N, D] or [C, N, D], got {list(colors.shape)}")
    else:
        if colors.shape[:-2] not in ((n,), (c, n)) or colors.shape[-1] != 3:
            raise Difix3DError(f"SH colors must be [N, K, 3] or [C, N, K, 3], got {list(colors.shape)}")
        if not 0 <= sh_degree <= 3 or (sh_degree + 1) ** 2 > colors.shape[-2]:
            raise Difix3DError(f"sh_degree {sh_degree} needs 0..3 and ({sh_degree}+1)^2 <= K={colors.shape[-2]}")
    if backgrounds is not None and backgrounds.shape[0] != c:
        raise Difix3DError(f"backgrounds must be [C, D], got {list(backgrounds.shape)}")


def _covariance_factor(quats: Optional[Tensor], scales: Optional[Tensor], covars: Optional[Tensor]) -> Tensor:
    """M [N, 3, 3] with covariance M M^T: R S from wxyz quaternions (normalized here) and scales,
    or the Cholesky factor of given covariances."""
    if covars is not None:
        factor, info = torch.linalg.cholesky_ex(covars)
        if bool((info > 0).any()):
            raise Difix3DError("covars must be symmetric positive definite")
        return factor
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rotation = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)
    return rotation * scales[:, None, :]


def _project(means, factors, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip):
    """gsplat's fully_fused_projection (pinhole, unpacked) in PyTorch; culled entries are zero.

    `factors` M [N, 3, 3] give the 3D covariances M M^T. Returns radii [C, N] int32, means2d
    [C, N, 2], depths [C, N], conics [C, N, 3] (a, b, c of the inverse blurred 2D covariance) and
    compensations [C, N].
    """
    n_cameras, n_gaussians = viewmats.shape[0], means.shape[0]
    rotations, translations = viewmats[:, :3, :3], viewmats[:, :3, 3]
    means_cam = means @ rotations.transpose(1, 2) + translations[:, None, :]
    x, y, z = means_cam.unbind(-1)
    in_depth = (z >= near_plane) & (z <= far_plane)
    # Culled entries get harmless stand-ins so that their (discarded) gradients stay finite.
    z = torch.where(in_depth, z, torch.ones_like(z))

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # The Jacobian is evaluated at a point clamped to 1.3x the field of view, as gsplat does.
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    tx = torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / z))
    ty = torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / z))
    # Camera-space covariance factor W = R_view M as one matrix product: [C, 3 (row), N, 3].
    factors_cam = (rotations @ factors.transpose(0, 1).reshape(3, -1)).reshape(n_cameras, 3, n_gaussians, 3)
    # Rows of J W with J = [[fx/z, 0, -fx tx/z], [0, fy/z, -fy ty/z]] (tx, ty clamped x/z, y/z).
    row_x = (fx / z)[..., None] * (factors_cam[:, 0] - tx[..., None] * factors_cam[:, 2])
    row_y = (fy / z)[..., None] * (factors_cam[:, 1] - ty[..., None] * factors_cam[:, 2])
    a, b, c = (row_x * row_x).sum(-1), (row_x * row_y).sum(-1), (row_y * row_y).sum(-1)
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    compensations = torch.sqrt(torch.clamp(det_orig / det, min=0.0))
    valid = in_depth & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c, -b, a], dim=-1) / det[..., None]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)

    with torch.no_grad():
        half_trace = 0.5 * (a + c)
        radius = torch.ceil(3.0 * torch.sqrt(half_trace + torch.sqrt(torch.clamp(half_trace**2 - det, min=0.01))))
        u, v = means2d.unbind(-1)
        on_screen = (u + radius > 0) & (u - radius < width) & (v + radius > 0) & (v - radius < height)
        valid = valid & (radius > radius_clip) & on_screen
        radii = torch.where(valid, radius, torch.zeros_like(radius)).to(torch.int32)
    keep = valid[..., None]
    return (
        radii,
        torch.where(keep, means2d, 0.0),
        torch.where(valid, means_cam[..., 2], 0.0),
        torch.where(keep, conics, 0.0),
        torch.where(valid, compensations, 0.0),
    )


def _eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Colours [..., 3] from SH coefficients [..., K, 3] along unit directions [..., 3]."""
    x, y, z = dirs.unbind(-1)
    bases = [torch.full_like(x, _SH_C0)]
    if degree >= 1:
        bases += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        bases += [
            _SH_C2[0] * xy,
            _SH_C2[1] * yz,
            _SH_C2[2] * (2 * zz - xx - yy),
            _SH_C2[3] * xz,
            _SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        bases += [
            _SH_C3[0] * y * (3 * xx - yy),
            _SH_C3[1] * xy * z,
            _SH_C3[2] * y * (4 * zz - xx - yy),
            _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _SH_C3[4] * x * (4 * zz - xx - yy),
            _SH_C3[5] * z * (xx - yy),
            _SH_C3[6] * x * (xx - 3 * yy),
        ]
    bases = torch.stack(bases, dim=-1)
    return (bases[..., None] * coeffs[..., : bases.shape[-1], :]).sum(dim=-2)


def _camera_colors(means: Tensor, colors: Tensor, viewmats: Tensor, sh_degree: Optional[int]) -> Tensor:
    """Per-camera colours [C, N, D]: post-activation values as given, or SH evaluated + 0.5, >= 0."""
    n_cameras = viewmats.shape[0]
    if sh_degree is None:
        return colors.expand(n_cameras, *colors.shape[-2:])
    camera_centers = torch.linalg.inv(viewmats)[:, :3, 3]
    dirs = F.normalize(means[None, :, :] - camera_centers[:, None, :], dim=-1)
    coeffs = colors.expand(n_cameras, *colors.shape[-3:])
    return torch.clamp_min(_eval_sh(sh_degree, dirs, coeffs) + 0.5, 0.0)


def _tile_ranges(means2d: Tensor, radii: Tensor, tile_size: int, tile_width: int, tile_height: int):
    """gsplat's isect_tiles: per Gaussian the tile rectangle [min, max) its radius touches."""
    radius = radii.to(means2d.dtype) / tile_size
    tile_x, tile_y = (means2d / tile_size).unbind(-1)
    visible = radii > 0

    def span(center, limit):
        low = torch.clamp(torch.floor(center - radius), 0, limit)
        high = torch.clamp(torch.ceil(center + radius), 0, limit)
        return torch.where(visible, low, 0).long(), torch.where(visible, high, 0).long()

    return span(tile_x, tile_width), span(tile_y, tile_height)


class _FrameGeometry:
    """Non-tensor facts about one rasterization call, passed through autograd untouched."""

    def __init__(self, width, height, n_cameras, tile_size, row_cameras, absgrad):
        self.width, self.height, self.n_cameras = width, height, n_cameras
        self.tile_size, self.row_cameras, self.absgrad = tile_size, row_cameras, absgrad

    @property
    def n_pixels(self) -> int:
        return self.n_cameras * self.height * self.width


def _pairs(means2d: Tensor, conics: Tensor, opacities: Tensor, radii: Tensor, depths: Tensor,
           geometry: _FrameGeometry):
    """The (Gaussian, pixel) pairs that may contribute, grouped by pixel in depth order.

    A pair is listed when the pixel lies in one of the Gaussian's tiles and inside the ellipse where
    opacity * exp(-sigma) >= 1/255 (plus a hair of slack; the exact test happens in compositing).

    Returns (rows, gaussian_of_pair, pixel_of_pair, pairs_per_pixel): `rows` are the indices of the
    visible input rows in depth order, `gaussian_of_pair` indexes into `rows`.
    """
    width, height, tile_size = geometry.width, geometry.height, geometry.tile_size
    device = means2d.device
    visible = torch.nonzero(radii > 0).squeeze(1)
    rows = visible[torch.argsort(depths[visible], stable=True)]
    mean_x, mean_y = means2d[rows].double().unbind(-1)
    a, b, c = conics[rows].double().unbind(-1)
    opacity = opacities[rows].double()
    radius = radii[rows].double()
    # sigma bound where alpha reaches 1/255; Gaussians fainter than that never contribute.
    sigma_max = torch.log(torch.clamp(opacity * 255.0, min=1e-12))
    det = a * c - b * b
    half_extent_y = torch.sqrt(torch.clamp(2 * sigma_max * a / det, min=0.0))

    def clip(center, extent, image_size):
        n_tiles = -(-image_size // tile_size)
        tile_lo = torch.clamp(torch.floor(center / tile_size - radius / tile_size), 0, n_tiles) * tile_size
        tile_hi = torch.clamp(torch.ceil(center / tile_size + radius / tile_size), 0, n_tiles) * tile_size - 1
        lo = torch.maximum(torch.ceil(center - extent - 0.5 - _BOUND_SLACK), tile_lo).clamp(min=0)
        hi = torch.minimum(torch.floor(center + extent - 0.5 + _BOUND_SLACK), tile_hi).clamp(max=image_size - 1)
        return lo, hi

    y_lo, y_hi = clip(mean_y, half_extent_y, height)
    x_lo, x_hi = clip(mean_x, torch.full_like(mean_x, math.inf), width)
    n_lines = torch.where(sigma_max > 0, y_hi - y_lo + 1, 0).clamp(min=0).long()

    # One entry per (Gaussian, image row): the exact x-interval of the ellipse on that row.
    line_gaussian = torch.repeat_interleave(torch.arange(len(rows), device=device), n_lines)
    line_start = torch.cumsum(n_lines, 0) - n_lines
    line_y = y_lo[line_gaussian] + (torch.arange(len(line_gaussian), device=device) - line_start[line_gaussian])
    dy = mean_y[line_gaussian] - (line_y + 0.5)
    la, lb, lc = a[line_gaussian], b[line_gaussian], c[line_gaussian]
    # 0.5 * (a dx^2 + 2 b dx dy + c dy^2) <= sigma_max, solved for dx = mean_x - (x + 0.5).
    disc = (lb * dy) ** 2 - la * (lc * dy * dy - 2 * sigma_max[line_gaussian])
    root = torch.sqrt(torch.clamp(disc, min=0.0))
    dx_lo, dx_hi = (-lb * dy - root) / la, (-lb * dy + root) / la
    line_mean_x = mean_x[line_gaussian]
    x_start = torch.maximum(torch.ceil(line_mean_x - 0.5 - dx_hi - _BOUND_SLACK), x_lo[line_gaussian])
    x_end = torch.minimum(torch.floor(line_mean_x - 0.5 - dx_lo + _BOUND_SLACK), x_hi[line_gaussian])
    n_line_pixels = torch.where(disc >= 0, x_end - x_start + 1, 0).clamp(min=0).long()

    # Per line, the pixel id of its first pair minus that pair's position in the list, so that
    # pixel = offset of the pair's line + pair position; grouped by pixel with scipy below.
    pixels_before_line = torch.cumsum(n_line_pixels, 0) - n_line_pixels
    line_camera = geometry.row_cameras[rows][line_gaussian]
    line_offset = line_camera * (height * width) + line_y.long() * width + x_start.long() - pixels_before_line
    pairs_per_gaussian = torch.zeros_like(n_lines).index_add_(0, line_gaussian, n_line_pixels)
    gaussian, pixel, pairs_per_pixel = _group_by_pixel(
        line_offset.cpu().numpy(), n_line_pixels.cpu().numpy(), pairs_per_gaussian.cpu().numpy(), geometry.n_pixels
    )
    return rows, gaussian.to(device), pixel.to(device), pairs_per_pixel.to(device)


def _group_by_pixel(line_offset: np.ndarray, n_line_pixels: np.ndarray, pairs_per_gaussian: np.ndarray,
                    n_pixels: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Expand lines into pairs and order them by pixel, keeping depth order within each pixel.

    The pairs form a CSR matrix (depth-ordered Gaussian x pixel); its CSC transpose is a stable
    counting sort by pixel, one O(pairs + pixels) pass in scipy, several times faster than sorting.
    Returns the Gaussian (int32, into the depth order) and pixel (int32) of each pair, and the
    number of pairs per pixel.
    """
    n_pairs = int(n_line_pixels.sum())
    if n_pairs >= 2**31 - 1:
        raise Difix3DError(f"{n_pairs} Gaussian-pixel pairs exceed the CPU rasterizer's int32 indexing")
    pixel_of_pair = np.repeat(line_offset.astype(np.int32), n_line_pixels) + np.arange(n_pairs, dtype=np.int32)
    indptr = np.zeros(len(pairs_per_gaussian) + 1, dtype=np.int32)
    np.cumsum(pairs_per_gaussian, out=indptr[1:])
    by_gaussian = scipy.sparse.csr_matrix(
        (np.ones(n_pairs, dtype=np.int8), pixel_of_pair, indptr), shape=(len(pairs_per_gaussian), n_pixels)
    )
    by_pixel = by_gaussian.tocsc()
    pairs_per_pixel = np.diff(by_pixel.indptr)
    pixel = np.repeat(np.arange(n_pixels, dtype=np.int32), pairs_per_pixel)
    return torch.from_numpy(by_pixel.indices), torch.from_numpy(pixel), torch.from_numpy(pairs_per_pixel.astype(np.int64))


def _segment_sum(values: Tensor, lengths: Tensor) -> Tensor:
    """Sums of consecutive runs of `values` (run lengths `lengths`, zero allowed)."""
    return torch.segment_reduce(values, "sum", lengths=lengths, unsafe=True, initial=0)


def _segmented_cumsum(values: Tensor, segment_of: Tensor, lengths: Tensor) -> Tensor:
    """Inclusive cumulative sums restarting at each run (`segment_of[i]` is the run of element i)."""
    running = torch.cumsum(values, 0)
    if len(running) == 0:
        return running
    first = torch.cumsum(lengths, 0) - lengths
    before = torch.where(first > 0, running[(first - 1).clamp(min=0)], 0.0)
    return running - before.index_select(0, segment_of)


def _sum_by_gaussian(per_pair, gaussian: Tensor, n_gaussians: int) -> Tensor:
    """Sequence of K per-pair tensors -> [n_gaussians, K]; 1-D index_adds (2-D ones are slow on CPU)."""
    sums = per_pair[0].new_zeros(len(per_pair), n_gaussians)
    for values, out in zip(per_pair, sums):
        out.index_add_(0, gaussian, values)
    return sums.T


def _to_rows(per_visible: Tensor, rows: Tensor, like: Tensor) -> Tensor:
    """Scatter per-visible-Gaussian values back into a zero tensor shaped like `like`."""
    n_rows = like.numel() // math.prod(per_visible.shape[1:])
    out = per_visible.new_zeros(n_rows, *per_visible.shape[1:])
    out[rows] = per_visible
    return out.reshape(like.shape)


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing over the sparse pair list, with a hand-written backward.

    Everything per pair is a 1-D tensor gathered from small per-Gaussian or per-pixel tables (on CPU
    several times faster than gathering rows of 2-D tensors), updated in place where possible.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, backgrounds, radii, depths, geometry):
        n_channels, dtype = colors.shape[-1], means2d.dtype
        width, height = geometry.width, geometry.height
        rows, gaussian, pixel, pairs_per_pixel = _pairs(
            means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1), radii.reshape(-1),
            depths.reshape(-1), geometry,
        )
        mean_x, mean_y = _tables(means2d.reshape(-1, 2), rows)
        conic_a, conic_b, conic_c = _tables(conics.reshape(-1, 3), rows)
        pixel_y, pixel_x = torch.meshgrid(torch.arange(height, dtype=dtype) + 0.5,
                                          torch.arange(width, dtype=dtype) + 0.5, indexing="ij")
        pixel_x, pixel_y = pixel_x.flatten().repeat(geometry.n_cameras), pixel_y.flatten().repeat(geometry.n_cameras)

        dx = mean_x.index_select(0, gaussian).sub_(pixel_x.index_select(0, pixel))
        dy = mean_y.index_select(0, gaussian).sub_(pixel_y.index_select(0, pixel))
        # sigma = 0.5 a dx^2 + b dx dy + 0.5 c dy^2 (gsplat's conic convention)
        sigma = (0.5 * conic_a).index_select(0, gaussian).mul_(dx).addcmul_(conic_b.index_select(0, gaussian), dy)
        sigma.mul_(dx).addcmul_((0.5 * conic_c).index_select(0, gaussian).mul_(dy), dy)
        gauss = torch.exp(-sigma)
        raw_alpha = opacities.reshape(-1)[rows].index_select(0, gaussian).mul_(gauss)
        alpha = torch.where((sigma >= 0) & (raw_alpha >= ALPHA_MIN), raw_alpha.clamp(max=ALPHA_MAX), 0.0)
        del sigma

        # Transmittance before each pair: exclusive cumulative sum of log(1 - alpha) per pixel,
        # in float64 because the running sum spans the whole image.
        log_keep = torch.log1p(-alpha).double()
        inclusive = _segmented_cumsum(log_keep, pixel, pairs_per_pixel)
        transmittance = torch.exp(inclusive.sub(log_keep).to(dtype))
        # gsplat stops a pixel at the Gaussian that takes T to 1e-4 or below, without adding it.
        contributes = (inclusive > math.log(TRANSMITTANCE_MIN)) & (alpha > 0)
        del inclusive, log_keep
        active = contributes & (raw_alpha < ALPHA_MAX)  # pairs whose alpha has a gradient
        n_contributing = int(contributes.sum())
        if n_contributing < 0.9 * len(contributes):
            # Many pixels stopped early: drop the dead pairs before the weights and the backward.
            keep = torch.nonzero(contributes).squeeze(1)
            gaussian, pixel, alpha, gauss, dx, dy, transmittance, active = (
                t.index_select(0, keep) for t in (gaussian, pixel, alpha, gauss, dx, dy, transmittance, active)
            )
            pairs_per_pixel = torch.bincount(pixel, minlength=geometry.n_pixels)
        else:
            alpha = alpha.mul_(contributes)

        weight = alpha * transmittance
        image = torch.stack([
            _segment_sum(table.index_select(0, gaussian).mul_(weight), pairs_per_pixel)
            for table in _tables(colors.reshape(-1, n_channels), rows)
        ], dim=-1)
        image_alpha = _segment_sum(weight, pairs_per_pixel)
        final_transmittance = 1 - image_alpha
        pixel_cameras = torch.arange(geometry.n_cameras).repeat_interleave(width * height)
        if backgrounds is not None:
            image = image + final_transmittance[:, None] * backgrounds[pixel_cameras]

        ctx.geometry = geometry
        ctx.has_backgrounds = backgrounds is not None
        ctx.save_for_backward(
            means2d, conics, opacities, colors, backgrounds if backgrounds is not None else torch.empty(0),
            rows, gaussian, pixel, pairs_per_pixel, weight, alpha, gauss, dx, dy, transmittance, active,
            final_transmittance, pixel_cameras,
        )
        shape = (geometry.n_cameras, height, width)
        return image.reshape(*shape, n_channels), image_alpha.reshape(*shape, 1)

    @staticmethod
    def backward(ctx, grad_image, grad_alpha):
        (means2d, conics, opacities, colors, backgrounds, rows, gaussian, pixel, pairs_per_pixel, weight, alpha,
         gauss, dx, dy, transmittance, active, final_transmittance, pixel_cameras) = ctx.saved_tensors
        geometry = ctx.geometry
        n_channels = colors.shape[-1]
        grad_image = grad_image.reshape(-1, n_channels)

        # Per channel: the pair's pixel gradient g, d loss / d colour = w g, and v = colour . g.
        per_pair = []
        color_dot = torch.zeros_like(alpha)
        for table, grad_channel in zip(_tables(colors.reshape(-1, n_channels), rows), grad_image.T):
            pair_grad = grad_channel.contiguous().index_select(0, pixel)
            color_dot.addcmul_(table.index_select(0, gaussian), pair_grad)
            per_pair.append(pair_grad.mul_(weight))

        # d loss / d alpha_i = T_i v_i - (sum_{j>i} w_j v_j + T_final (bg . g - g_alpha)) / (1 - alpha_i)
        # with w = alpha T the weight of a pair.
        weighted = (weight * color_dot).double()
        behind = _segment_sum(weighted, pairs_per_pixel).index_select(0, pixel)
        behind = behind.sub_(_segmented_cumsum(weighted, pixel, pairs_per_pixel)).to(alpha.dtype)
        del weighted
        after_last = -grad_alpha.reshape(-1)
        if ctx.has_backgrounds:
            after_last = after_last + (backgrounds[pixel_cameras] * grad_image).sum(-1)
        behind.add_((final_transmittance * after_last).index_select(0, pixel)).div_(1 - alpha)
        grad_alpha_pair = color_dot.mul_(transmittance).sub_(behind).mul_(active)
        del behind

        grad_opacity = gauss * grad_alpha_pair
        grad_sigma = grad_alpha_pair.mul_(alpha).neg_()
        conic_a, conic_b, conic_c = (t.index_select(0, gaussian) for t in _tables(conics.reshape(-1, 3), rows))
        grad_mean_x = (conic_a * dx).addcmul_(conic_b, dy).mul_(grad_sigma)
        grad_mean_y = (conic_c * dy).addcmul_(conic_b, dx).mul_(grad_sigma)
        grad_conic_b = (dx * dy).mul_(grad_sigma)
        grad_sigma.mul_(0.5)
        per_pair = [grad_mean_x, grad_mean_y, dx.square().mul_(grad_sigma), grad_conic_b,
                    dy.square().mul_(grad_sigma), grad_opacity, *per_pair]
        if geometry.absgrad:
            per_pair += [grad_mean_x.abs(), grad_mean_y.abs()]
        sums = _sum_by_gaussian(per_pair, gaussian, len(rows))

        if geometry.absgrad:
            means2d.absgrad = _to_rows(sums[:, -2:], rows, means2d)
        grad_backgrounds = None
        if ctx.has_backgrounds and ctx.needs_input_grad[4]:
            grad_backgrounds = torch.zeros_like(backgrounds).index_add_(
                0, pixel_cameras, final_transmittance[:, None] * grad_image
            )
        return (
            _to_rows(sums[:, 0:2], rows, means2d),
            _to_rows(sums[:, 2:5], rows, conics),
            _to_rows(sums[:, 5], rows, opacities),
            _to_rows(sums[:, 6 : 6 + n_channels], rows, colors),
            grad_backgrounds,
            None,
            None,
            None,
        )


def _tables(values: Tensor, rows: Tensor):
    """The columns of values[rows] as contiguous 1-D tables (per visible Gaussian, depth order)."""
    return values[rows].T.contiguous().unbind(0)
