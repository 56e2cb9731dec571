"""Surface textures of the procedural scenes, for each scene content.

- `shapes` (the original content): smooth multi-scale colour noise with scattered discs and
  rectangles on every surface; dense, unique structure for SIFT, nothing a prior could learn.
- `materials`: what rooms are made of. Wooden or tiled floors (sometimes a rug), plaster walls
  with a baseboard, framed photographs, doors and windows, now and then a brick wall; objects of
  wood, fabric, marble or stone, or painted with a printed photograph. The photographs and the
  grey material scans are scikit-image's sample images that are public domain or CC0 (their
  licences are in the `skimage.data` docstrings; listed in `PHOTOGRAPHS` and `GREY_SCANS`).

A texture covers a `width_m` x `height_m` surface at `texel_m` metres per texel, shape (3, H, W),
float32 in [0, 1]; row 0 is the surface's v = 0 (the bottom of a wall), so photographs are stored
upside down to hang upright. Every texture is a function of the random generator it is given.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from difix3d.errors import Difix3DError

# scikit-image sample images without copyright restrictions (public domain or CC0).
PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera")
GREY_SCANS = ("brick", "grass", "gravel")
# Physical width of one grey scan (512 texels) when it covers a surface.
_SCAN_WIDTH_M = {"brick": 1.6, "grass": 1.0, "gravel": 0.8}

_WOOD_TONES = ((0.55, 0.36, 0.20), (0.70, 0.50, 0.30), (0.42, 0.26, 0.15), (0.80, 0.64, 0.44), (0.62, 0.42, 0.28))
_WALL_PAINTS = ((0.86, 0.84, 0.78), (0.80, 0.83, 0.85), (0.88, 0.80, 0.68), (0.70, 0.78, 0.72), (0.90, 0.88, 0.86),
                (0.76, 0.70, 0.80), (0.62, 0.70, 0.80))  # fmt: skip


# ------------------------------------------------------------------------------------ noise


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell_texels: float) -> torch.Tensor:
    """Value noise: random colours on a grid `cell_texels` apart, interpolated bicubically."""
    grid_h = max(2, math.ceil(shape[0] / cell_texels) + 1)
    grid_w = max(2, math.ceil(shape[1] / cell_texels) + 1)
    grid = torch.from_numpy(rng.random((1, 3, grid_h, grid_w), dtype=np.float32))
    full = F.interpolate(grid, scale_factor=cell_texels, mode="bicubic", align_corners=False)
    return full[0, :, : shape[0], : shape[1]]


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell_rows: float, cell_cols: float) -> np.ndarray:
    """Grey value noise (H, W) in [0, 1] on a grid of `cell_rows` x `cell_cols` texels."""
    grid_h = max(2, math.ceil(shape[0] / cell_rows) + 2)
    grid_w = max(2, math.ceil(shape[1] / cell_cols) + 2)
    grid = torch.from_numpy(rng.random((1, 1, grid_h, grid_w), dtype=np.float32))
    size = (max(shape[0], round(grid_h * cell_rows)), max(shape[1], round(grid_w * cell_cols)))
    full = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    return full[0, 0, : shape[0], : shape[1]].clamp(0, 1).numpy()


def _fractal(rng: np.random.Generator, shape: tuple[int, int], cell: float, octaves: int = 4, stretch: float = 1.0) -> np.ndarray:
    """Fractal (multi-octave) noise (H, W) around 0.5; `stretch` > 1 elongates it along rows."""
    total = np.zeros(shape, dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for _ in range(octaves):
        total += amplitude * (_noise(rng, shape, max(1.0, cell), max(1.0, cell * stretch)) - 0.5)
        norm += amplitude
        amplitude, cell = amplitude / 2, cell / 2
    return 0.5 + total / norm


def texel_shape(width_m: float, height_m: float, texel_m: float) -> tuple[int, int]:
    """(H, W) texels of a `width_m` x `height_m` surface: a texel on each edge."""
    return math.ceil(height_m / texel_m) + 1, math.ceil(width_m / texel_m) + 1


def _texel_grid(width_m: float, height_m: float, texel_m: float) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) in metres of every texel, each (H, W)."""
    shape = texel_shape(width_m, height_m, texel_m)
    v, u = np.mgrid[: shape[0], : shape[1]].astype(np.float32) * texel_m
    return u, v


def _line_alpha(distance_m: np.ndarray, half_width_m: float, texel_m: float) -> np.ndarray:
    """Coverage of a line `half_width_m` either side, its edge anti-aliased over one texel."""
    return np.clip((half_width_m - distance_m) / texel_m + 0.5, 0.0, 1.0)


def _jitter(rng: np.random.Generator, colour, amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float32) * (1 + rng.uniform(-amount, amount, 3)), 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------ the shapes content


def _paint_shapes(rng: np.random.Generator, texture: np.ndarray, texel_m: float, feature_m: float, count: int) -> None:
    """Paints soft-edged discs and rotated rectangles of random colour, 1-7 `feature_m` across."""
    height, width = texture.shape[1:]
    for _ in range(count):
        size = rng.uniform(feature_m, 7 * feature_m) / texel_m / 2  # half size in texels
        aspect = rng.uniform(0.4, 1.0)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        angle = rng.uniform(0, math.pi)
        colour = rng.random(3, dtype=np.float32)
        is_disc = rng.random() < 0.5
        x0, x1 = int(max(0, cx - size - 2)), int(min(width, cx + size + 3))
        y0, y1 = int(max(0, cy - size - 2)), int(min(height, cy + size + 3))
        if x0 >= x1 or y0 >= y1:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
        along = dx * math.cos(angle) + dy * math.sin(angle)
        across = -dx * math.sin(angle) + dy * math.cos(angle)
        if is_disc:
            signed_distance = np.hypot(along, across / aspect) - size
        else:
            signed_distance = np.maximum(np.abs(along) - size, np.abs(across) - size * aspect)
        # One-texel soft edge: anti-aliased, but still a sharp corner for SIFT.
        alpha = np.clip(0.5 - signed_distance, 0.0, 1.0)
        region = texture[:, y0:y1, x0:x1]
        region += alpha * (colour[:, None, None] - region)


def shapes_texture(
    rng: np.random.Generator, width_m: float, height_m: float, texel_m: float, feature_m: float
) -> torch.Tensor:
    """A colourful, non-repeating texture for a `width_m` x `height_m` surface, shape (3, H, W).

    Smooth multi-scale colour noise plus scattered shapes, nothing finer than `feature_m`: strong,
    unique structure that SIFT finds at twice the training resolution, without pixel-scale noise
    that a Gaussian splatting model could not fit at the training resolution.
    """
    shape = texel_shape(width_m, height_m, texel_m)
    base = torch.from_numpy(rng.random(3, dtype=np.float32))[:, None, None]
    texture = 0.35 * base + 0.3
    for cells, amplitude in ((8, 0.5), (3, 0.45), (1.2, 0.3)):
        texture = texture + amplitude * (smooth_noise(rng, shape, cells * feature_m / texel_m) - 0.5)
    texture = texture.clamp(0, 1).numpy().copy()
    count = max(3, round(0.04 * width_m * height_m / feature_m**2))
    _paint_shapes(rng, texture, texel_m, feature_m, count)
    return torch.from_numpy(texture)


# ------------------------------------------------------------------------------------ images


@functools.lru_cache(maxsize=None)
def _sample_image(name: str) -> np.ndarray:
    """A scikit-image sample image as float32 (H, W, 3) in [0, 1]."""
    try:
        import skimage.data
    except ImportError as error:
        raise Difix3DError("the 'materials' scene content needs scikit-image: pip install scikit-image") from error
    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def _resized(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """`image` (H, W, 3) centre-cropped to the aspect of rows x cols and resized: (3, rows, cols)."""
    height, width = image.shape[:2]
    if width * rows > height * cols:  # too wide: crop the sides
        keep = max(1, round(height * cols / rows))
        image = image[:, (width - keep) // 2 : (width - keep) // 2 + keep]
    else:
        keep = max(1, round(width * rows / cols))
        image = image[(height - keep) // 2 : (height - keep) // 2 + keep]
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    resized = F.interpolate(tensor, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp(0, 1).numpy()


def _photograph(name: str, rows: int, cols: int) -> np.ndarray:
    """A photograph filling rows x cols texels, hung upright (row 0 is its bottom)."""
    return _resized(_sample_image(name), rows, cols)[:, ::-1].copy()


def _grey_scan(rng: np.random.Generator, name: str, shape: tuple[int, int], texel_m: float, tint) -> np.ndarray:
    """A grey material scan repeated at its physical size (mirrored repeats, so no seams), tinted."""
    scan = _sample_image(name)[..., 0]
    scan_texels = max(8, round(_SCAN_WIDTH_M[name] / texel_m))
    scan = _resized(np.repeat(scan[..., None], 3, axis=2), scan_texels, scan_texels)[0]
    tile = np.block([[scan, scan[:, ::-1]], [scan[::-1], scan[::-1, ::-1]]])
    reps = (math.ceil(shape[0] / tile.shape[0]) + 1, math.ceil(shape[1] / tile.shape[1]) + 1)
    offset = rng.integers(0, tile.shape[0]), rng.integers(0, tile.shape[1])
    grey = np.tile(tile, reps)[offset[0] : offset[0] + shape[0], offset[1] : offset[1] + shape[1]]
    # Keep the scan's contrast but centre it on the tint.
    grey = 1.0 + 1.2 * (grey - grey.mean())
    return np.clip(np.asarray(tint, dtype=np.float32)[:, None, None] * grey[None], 0, 1).astype(np.float32)


def _paste(texture: np.ndarray, patch: np.ndarray, row: int, col: int) -> None:
    """Copies `patch` (3, h, w) into `texture` with its corner at (row, col), clipped to the texture."""
    rows, cols = texture.shape[1:]
    r0, c0 = max(0, row), max(0, col)
    r1, c1 = min(rows, row + patch.shape[1]), min(cols, col + patch.shape[2])
    if r0 < r1 and c0 < c1:
        texture[:, r0:r1, c0:c1] = patch[:, r0 - row : r1 - row, c0 - col : c1 - col]


# ------------------------------------------------------------------------------------ materials


def _wood(rng: np.random.Generator, width_m: float, height_m: float, texel_m: float, tone=None) -> np.ndarray:
    """Planks along u with staggered end joints, per-board tint and grain."""
    u, v = _texel_grid(width_m, height_m, texel_m)
    tone = _jitter(rng, tone if tone is not None else _WOOD_TONES[rng.integers(len(_WOOD_TONES))], 0.08)
    plank_width, board_length = rng.uniform(0.1, 0.22), rng.uniform(0.8, 1.8)
    row = np.floor(v / plank_width).astype(np.int64)
    offsets = rng.uniform(0, board_length, row.max() + 1).astype(np.float32)
    along = u + offsets[row]
    board = np.floor(along / board_length).astype(np.int64)
    tints = rng.normal(0.0, 0.09, (row.max() + 1, board.max() + 1)).astype(np.float32)
    shape = u.shape
    grain = _fractal(rng, shape, 0.03 / texel_m, octaves=3, stretch=25.0)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (v / 0.035 + 6.0 * (_fractal(rng, shape, 0.25 / texel_m, 2, 4.0) - 0.5)))
    shade = (1 + tints[row, board]) * (0.82 + 0.18 * rings) * (0.8 + 0.4 * grain)
    across = np.abs(v - (row + 0.5) * plank_width)
    seam = np.maximum(
        _line_alpha(plank_width / 2 - across, 0.004, texel_m),
        _line_alpha(np.minimum(along % board_length, board_length - along % board_length), 0.004, texel_m),
    )
    shade = shade * (1 - 0.55 * seam)
    return np.clip(tone[:, None, None] * shade[None], 0, 1).astype(np.float32)


def _marble_veins(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, texel_m: float) -> np.ndarray:
    """Vein strength (H, W) in [0, 1]: thin dark lines along a turbulent direction."""
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(0.15, 0.4)
    turbulence = _fractal(rng, u.shape, 0.2 / texel_m, octaves=4) - 0.5
    phase = (u * np.cos(angle) + v * np.sin(angle)) / period + 3.0 * turbulence
    return (1 - np.abs(np.sin(np.pi * phase))) ** 6


def _marble(rng: np.random.Generator, width_m: float, height_m: float, texel_m: float) -> np.ndarray:
    u, v = _texel_grid(width_m, height_m, texel_m)
    base = _jitter(rng, [(0.92, 0.91, 0.88), (0.25, 0.26, 0.28), (0.85, 0.78, 0.70), (0.55, 0.65, 0.58)][rng.integers(4)], 0.05)
    vein_colour = np.clip(base * rng.uniform(0.35, 0.6) + (0.4 if base.mean() < 0.5 else 0.0), 0, 1)  # light veins on dark marble
    cloud = 0.92 + 0.16 * _fractal(rng, u.shape, 0.3 / texel_m)
    veins = _marble_veins(rng, u, v, texel_m)[None]
    texture = base[:, None, None] * cloud[None]
    return np.clip(texture + veins * (vein_colour[:, None, None] - texture), 0, 1).astype(np.float32)


def _tiles(rng: np.random.Generator, width_m: float, height_m: float, texel_m: float) -> np.ndarray:
    """Square tiles with grout lines; plain, checkered or marbled."""
    u, v = _texel_grid(width_m, height_m, texel_m)
    size, grout = rng.uniform(0.3, 0.6), rng.uniform(0.006, 0.012)
    col, row = np.floor(u / size).astype(np.int64), np.floor(v / size).astype(np.int64)
    first = _jitter(rng, rng.uniform(0.35, 0.95, 3), 0.0)
    style = rng.integers(3)
    second = _jitter(rng, rng.uniform(0.1, 0.9, 3), 0.0) if style == 1 else first
    colour = np.where(((col + row) % 2 == 0)[None], first[:, None, None], second[:, None, None])
    colour = colour * (1 + rng.normal(0, 0.05, (row.max() + 1, col.max() + 1)).astype(np.float32)[row, col])[None]
    if style == 2:
        veins = _marble_veins(rng, u, v, texel_m)[None]
        colour = colour * (1 - 0.5 * veins)
    else:  # speckled stoneware: structure inside each tile, so no two tiles look alike
        colour = colour * (0.85 + 0.3 * _fractal(rng, u.shape, 0.08 / texel_m, octaves=3))[None]
    edge = np.minimum(np.minimum(u % size, size - u % size), np.minimum(v % size, size - v % size))
    grout_alpha = _line_alpha(edge, grout, texel_m)[None]
    grout_colour = np.full((3, 1, 1), rng.choice([0.25, 0.8]), dtype=np.float32)
    return np.clip(colour + grout_alpha * (grout_colour - colour), 0, 1).astype(np.float32)


def _fabric(rng: np.random.Generator, width_m: float, height_m: float, texel_m: float) -> np.ndarray:
    """A plaid or striped weave: coloured bands along u and v, multiplied, with a fine weave."""
    u, v = _texel_grid(width_m, height_m, texel_m)
    palette = rng.uniform(0.1, 0.9, (3, 3)).astype(np.float32)

    def bands(coordinate: np.ndarray) -> np.ndarray:
        widths = rng.uniform(0.03, 0.2, 6)
        edges = np.cumsum(widths)
        index = np.searchsorted(edges, coordinate % edges[-1], side="right") % 6
        return palette[:, index % 3]

    plaid = rng.random() < 0.6
    colour = 0.5 * (bands(u) + bands(v)) if plaid else bands(v)
    weave = 0.93 + 0.07 * np.sin(2 * np.pi * u / max(0.02, 3 * texel_m)) * np.sin(2 * np.pi * v / max(0.02, 3 * texel_m))
    return np.clip(colour * weave[None], 0, 1).astype(np.float32)


def _paint(rng: np.random.Generator, width_m: float, height_m: float, texel_m: float, colour=None) -> np.ndarray:
    """A painted surface: one colour with a faint, smooth unevenness."""
    u, _ = _texel_grid(width_m, height_m, texel_m)
    colour = _jitter(rng, colour if colour is not None else rng.uniform(0.15, 0.95, 3), 0.03)
    unevenness = 0.94 + 0.12 * _fractal(rng, u.shape, 0.5 / texel_m, octaves=3)
    return np.clip(colour[:, None, None] * unevenness[None], 0, 1).astype(np.float32)


def _framed_photograph(rng: np.random.Generator, width_m: float, texel_m: float, name: str | None = None) -> np.ndarray:
    """A photograph `width_m` wide (frame included) in a frame of wood, black or white."""
    name = name or PHOTOGRAPHS[rng.integers(len(PHOTOGRAPHS))]
    image = _sample_image(name)
    cols = max(6, round(width_m / texel_m))
    rows = max(6, round(cols * image.shape[0] / image.shape[1]))
    border = max(1, round(rng.uniform(0.025, 0.06) / texel_m))
    frame_colour = [(0.08, 0.07, 0.06), (0.93, 0.92, 0.9), (0.45, 0.3, 0.18)][rng.integers(3)]
    framed = np.empty((3, rows, cols), dtype=np.float32)
    framed[:] = np.asarray(frame_colour, dtype=np.float32)[:, None, None]
    if rows > 2 * border and cols > 2 * border:
        framed[:, border:-border, border:-border] = _photograph(name, rows - 2 * border, cols - 2 * border)
    return framed


def _door(rng: np.random.Generator, texel_m: float) -> np.ndarray:
    """A panelled door, 0.9 x 2.1 m, in its frame."""
    cols, rows = round(0.9 / texel_m), round(2.1 / texel_m)
    door = _wood(rng, 2.1, 0.9, texel_m).transpose(0, 2, 1)[:, :rows, :cols].copy() if rng.random() < 0.5 else \
        _paint(rng, 0.9, 2.1, texel_m)[:, :rows, :cols].copy()  # fmt: skip
    inset = max(1, round(0.12 / texel_m))
    line = max(1, round(0.015 / texel_m))
    for bottom, top in ((inset, rows // 2 - inset // 2), (rows // 2 + inset // 2, rows - inset)):
        door[:, bottom : bottom + line, inset:-inset] *= 0.6
        door[:, top - line : top, inset:-inset] *= 1.15
        door[:, bottom:top, inset : inset + line] *= 0.6
        door[:, bottom:top, cols - inset - line : cols - inset] *= 1.15
    knob_row, knob_col = round(1.0 / texel_m), cols - max(2, round(0.1 / texel_m))
    radius = max(1, round(0.03 / texel_m))
    door[:, knob_row - radius : knob_row + radius, knob_col - radius : knob_col + radius] = np.array([0.8, 0.7, 0.3])[:, None, None]
    frame = max(1, round(0.06 / texel_m))
    framed = np.empty((3, rows + frame, cols + 2 * frame), dtype=np.float32)
    framed[:] = 0.9
    framed[:, :rows, frame:-frame] = door
    return np.clip(framed, 0, 1)


def _window(rng: np.random.Generator, width_m: float, height_m: float, texel_m: float) -> np.ndarray:
    """A window: sky (blue to pale), a little cloud, crossed by mullions, in a white frame."""
    u, v = _texel_grid(width_m, height_m, texel_m)
    height = v / max(v.max(), 1e-6)
    zenith, horizon = np.array([0.35, 0.55, 0.85]), np.array([0.85, 0.9, 0.95])
    sky = horizon[:, None, None] + height[None] * (zenith - horizon)[:, None, None]
    clouds = np.clip((_fractal(rng, u.shape, 0.4 / texel_m, 4, 2.0) - 0.55) * 3, 0, 1)[None]
    window = sky + clouds * (0.97 - sky)
    bar = 0.03
    mullions = np.maximum(
        _line_alpha(np.abs(u - width_m / 2), bar, texel_m), _line_alpha(np.abs(v - height_m / 2), bar, texel_m)
    )
    border = np.minimum(np.minimum(u, width_m - u), np.minimum(v, height_m - v))
    frame = np.maximum(mullions, _line_alpha(border, 2 * bar, texel_m))[None]
    return np.clip(window + frame * (0.95 - window), 0, 1).astype(np.float32)


def _bookshelf(rng: np.random.Generator, width_m: float, height_m: float, texel_m: float) -> np.ndarray:
    """A wooden bookshelf seen from the front: shelves of book spines of many colours and sizes."""
    cols, rows = round(width_m / texel_m), round(height_m / texel_m)
    shelf = _wood(rng, width_m, height_m, texel_m)[:, :rows, :cols].copy()
    board = max(1, round(0.03 / texel_m))
    levels = rng.integers(4, 6)
    level_rows = (rows - board) / levels
    for level in range(levels):
        bottom, top = round(level * level_rows) + board, round((level + 1) * level_rows)
        shelf[:, bottom:top, board:-board] *= 0.35  # the shadowed back of the shelf
        col = board
        while col < cols - board:
            width = max(1, round(rng.uniform(0.02, 0.06) / texel_m))
            if rng.random() < 0.08:  # a gap
                col += width
                continue
            height = max(1, round(rng.uniform(0.55, 0.9) * (top - bottom)))
            colour = rng.uniform(0.08, 0.95, 3).astype(np.float32)
            end = min(col + width, cols - board)
            shelf[:, bottom : bottom + height, col:end] = colour[:, None, None]
            if height > 4:  # a title band
                band = bottom + round(0.7 * height)
                shelf[:, band : band + 1, col:end] = (1 - colour)[:, None, None]
            col = end
    return np.clip(shelf, 0, 1)


# ------------------------------------------------------------------------------------ surfaces of a room


def _place_along(rng: np.random.Generator, width_m: float, widths: list[float], taken: list[tuple[float, float]]):
    """Left edges for items of `widths` along a wall, apart from `taken` intervals and each other."""
    lefts = []
    for width in widths:
        for _ in range(50):
            left = rng.uniform(0.2, width_m - width - 0.2)
            if all(left + width + 0.15 < a or left > b + 0.15 for a, b in taken):
                taken.append((left, left + width))
                lefts.append(left)
                break
        else:
            lefts.append(None)
    return lefts


def wall_texture(rng: np.random.Generator, width_m: float, height_m: float, texel_m: float, paint, brick: bool) -> np.ndarray:
    """A room wall: plaster (or brick) with a baseboard, framed photographs, maybe a door, a
    bookshelf and a window."""
    if brick:
        texture = _grey_scan(rng, "brick", texel_shape(width_m, height_m, texel_m), texel_m, _jitter(rng, (0.72, 0.42, 0.32), 0.1))
    else:
        texture = _paint(rng, width_m, height_m, texel_m, paint)
    taken: list[tuple[float, float]] = []
    if rng.random() < 0.4:
        (left,) = _place_along(rng, width_m, [1.02], taken)
        if left is not None:
            _paste(texture, _door(rng, texel_m), 0, round(left / texel_m))
    if rng.random() < 0.5:
        shelf_width = rng.uniform(1.0, 2.0)
        (left,) = _place_along(rng, width_m, [shelf_width], taken)
        if left is not None:
            _paste(texture, _bookshelf(rng, shelf_width, rng.uniform(1.5, 2.1), texel_m), 0, round(left / texel_m))
    if rng.random() < 0.5:
        window_width = rng.uniform(1.0, 1.8)
        (left,) = _place_along(rng, width_m, [window_width], taken)
        if left is not None:
            window = _window(rng, window_width, rng.uniform(0.9, 1.3), texel_m)
            _paste(texture, window, round(rng.uniform(0.9, 1.2) / texel_m), round(left / texel_m))
    widths = [float(w) for w in rng.uniform(0.5, 1.4, rng.integers(2, 6))]
    for width, left in zip(widths, _place_along(rng, width_m, widths, taken)):
        if left is not None:
            picture = _framed_photograph(rng, width, texel_m)
            bottom = rng.uniform(0.9, max(0.95, height_m - 0.3 - picture.shape[1] * texel_m))
            _paste(texture, picture, round(bottom / texel_m), round(left / texel_m))
    baseboard = max(1, round(rng.uniform(0.07, 0.14) / texel_m))
    texture[:, :baseboard] = np.asarray(_WOOD_TONES[rng.integers(len(_WOOD_TONES))] if rng.random() < 0.5 else (0.92, 0.92, 0.9),
                                        dtype=np.float32)[:, None, None]  # fmt: skip
    return texture


def floor_texture(rng: np.random.Generator, width_m: float, depth_m: float, texel_m: float) -> np.ndarray:
    """Wooden planks or tiles, half the time with a rug near the room's centre."""
    texture = _wood(rng, width_m, depth_m, texel_m) if rng.random() < 0.6 else _tiles(rng, width_m, depth_m, texel_m)
    if rng.random() < 0.5:
        rug_w, rug_d = rng.uniform(2.0, 3.6, 2)
        rug = _fabric(rng, rug_w, rug_d, texel_m)
        _paste(texture, rug, round((depth_m - rug_d) / 2 / texel_m), round((width_m - rug_w) / 2 / texel_m))
    return texture


def ceiling_texture(rng: np.random.Generator, width_m: float, depth_m: float, texel_m: float) -> np.ndarray:
    """White plaster with a few bright light panels."""
    texture = _paint(rng, width_m, depth_m, texel_m, (0.93, 0.93, 0.91))
    for _ in range(rng.integers(2, 5)):
        size = rng.uniform(0.4, 0.9)
        panel = np.full((3, round(size / texel_m), round(size / texel_m)), 1.0, dtype=np.float32)
        _paste(texture, panel, round(rng.uniform(1, depth_m - 1 - size) / texel_m), round(rng.uniform(1, width_m - 1 - size) / texel_m))
    return texture


# No plain paint: a large untextured object leaves SIFT nothing to match in views it fills.
OBJECT_MATERIALS = ("wood", "fabric", "marble", "stone", "printed")


class ObjectMaterial:
    """One material for every face of an object (each face gets its own piece of it)."""

    def __init__(self, rng: np.random.Generator, kinds: tuple[str, ...] = OBJECT_MATERIALS) -> None:
        # Every attribute is drawn whatever the kind, so one kind's choices never shift another's.
        self.kind = kinds[rng.integers(len(kinds))]
        self.tone = _WOOD_TONES[rng.integers(len(_WOOD_TONES))]
        self.colour = rng.uniform(0.15, 0.95, 3)
        self.scan = GREY_SCANS[1 + rng.integers(2)]  # grass or gravel: brick reads as a wall
        self.photograph = PHOTOGRAPHS[rng.integers(len(PHOTOGRAPHS))]

    def texture(self, rng: np.random.Generator, width_m: float, height_m: float, texel_m: float) -> np.ndarray:
        if self.kind == "wood":
            return _wood(rng, width_m, height_m, texel_m, self.tone)
        if self.kind == "fabric":
            return _fabric(rng, width_m, height_m, texel_m)
        if self.kind == "marble":
            return _marble(rng, width_m, height_m, texel_m)
        shape = texel_shape(width_m, height_m, texel_m)
        if self.kind == "stone":
            return _grey_scan(rng, self.scan, shape, texel_m, 0.4 + 0.5 * self.colour)
        texture = _paint(rng, width_m, height_m, texel_m, self.colour)
        if self.kind == "printed" and min(width_m, height_m) > 0.15:
            # A label: the photograph on the face's middle, a margin of paint around it.
            rows, cols = round(0.7 * shape[0]), round(0.7 * shape[1])
            _paste(texture, _photograph(self.photograph, rows, cols), (shape[0] - rows) // 2, (shape[1] - cols) // 2)
        return texture


def sphere_texture(rng: np.random.Generator, width_m: float, height_m: float, texel_m: float) -> np.ndarray:
    """A sphere's longitude x colatitude map: striped like a beach ball, marble, stone or a photograph."""
    kind = ("stripes", "marble", "stone", "photograph")[rng.integers(4)]
    if kind == "stripes":
        u, _ = _texel_grid(width_m, height_m, texel_m)
        count = int(rng.choice([4, 6, 8]))
        colours = rng.uniform(0.1, 0.95, (count, 3)).astype(np.float32)
        index = np.floor(u / width_m * count).astype(np.int64) % count
        return colours[index].transpose(2, 0, 1).copy()
    if kind == "photograph":
        return _photograph(PHOTOGRAPHS[rng.integers(len(PHOTOGRAPHS))], *texel_shape(width_m, height_m, texel_m))
    return ObjectMaterial(rng, (kind,)).texture(rng, width_m, height_m, texel_m)


def room_wall_styles(rng: np.random.Generator) -> tuple[tuple[float, float, float], list[bool]]:
    """The room's paint and, for each of its four walls, whether it is brick (at most one is)."""
    paint = _WALL_PAINTS[rng.integers(len(_WALL_PAINTS))]
    brick = [False] * 4
    if rng.random() < 0.35:
        brick[rng.integers(4)] = True
    return paint, brick
