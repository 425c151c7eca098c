"""A built-in synthetic video dataset that needs no files: sprites whose motion defines the class.

Every clip is drawn procedurally from ``(seed, index)`` alone, so any machine regenerates the
same data, at any number of frames and any resolution (positions, sizes and speeds are in
units of the frame size, so a clip at 128x128 is the 64x64 clip drawn finer).

Why this data set: adaptive-length tokenization needs clips whose information content differs
a lot. Here it does by construction. A clip is 1 to 6 sprites (circle, square, triangle,
diamond, ring, cross; flat or striped; radius 0.05 to 0.15 of the frame) over a flat or
textured background, moving with a per-clip speed drawn log-uniformly over a 20x range; the
motion pattern is the class label (all of these ranges are :class:`SyntheticConfig` fields):

==============  ===============================================================
``static``      nothing moves: the temporal difference is exactly zero
``linear``      constant velocity, wrapping around the frame edges
``bounce``      constant velocity, reflected by the frame edges
``circular``    orbits around a centre
``zoom``        sprites grow and shrink in place
``rotate``      sprites spin in place (circles are drawn as squares here)
``blink``       sprites fade out and back in, in place
``zigzag``      wrapping motion plus a sideways oscillation
``pan``         the camera moves: textured background and sprites shift together
``color_cycle`` sprites stay in place and their hue turns
==============  ===============================================================

Drawing is vectorised over frames and pixels with anti-aliased soft masks from signed
distance functions (a one-pixel ramp at every edge), computed only in the window a sprite can
reach: a 16x64x64 clip costs about 3 ms of one CPU core (about 350 clips/s, 16x128x128 about
220/s, measured in CPU time with one intra-op thread). The drawing is many small tensor ops,
which intra-op threads slow down on a busy machine: draw in DataLoader workers (one thread
each) or under ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch.utils.data import Dataset

from arvid.config import doc

CLASS_NAMES: tuple[str, ...] = (
    "static", "linear", "bounce", "circular", "zoom", "rotate", "blink", "zigzag", "pan", "color_cycle",
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "ring", "cross")

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): nearby seeds and indices give unrelated generator states."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 0x632BE59BD9B4E019) & _MASK64
    for _ in range(2):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z = z ^ (z >> 31)
    return z & ((1 << 63) - 1)


@dataclass
class SyntheticConfig:
    """What the synthetic clips look like; ``frames`` and ``size`` are given to the dataset."""

    max_objects: int = doc(6, "most sprites in a clip (at least 1); the count is uniform in 1..max_objects")
    min_radius: float = doc(0.05, "smallest sprite radius, in frame widths")
    max_radius: float = doc(0.15, "largest sprite radius, in frame widths (uniform in between; at most 0.5)")
    min_speed: float = doc(0.002, "slowest per-clip speed, in frame widths per frame")
    max_speed: float = doc(0.04, "fastest per-clip speed, in frame widths per frame (log-uniform in between)")
    textured_background_prob: float = doc(0.5, "probability that the background is a texture, not flat "
                                         "(pan clips always have one: the texture shows the camera move)")
    textured_sprite_prob: float = doc(0.4, "probability that a sprite is striped, not flat")
    fps_scale: float = doc(1.0, "multiplies all speeds: 0.5 looks like the same motion filmed at twice the fps")

    def __post_init__(self) -> None:
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        if not 0 < self.min_radius <= self.max_radius <= 0.5:
            raise ValueError(f"need 0 < min_radius <= max_radius <= 0.5, got {self.min_radius}, {self.max_radius}")
        if not 0 < self.min_speed <= self.max_speed:
            raise ValueError(f"need 0 < min_speed <= max_speed, got {self.min_speed}, {self.max_speed}")
        for name in ("textured_background_prob", "textured_sprite_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hue, saturation, value in [0, 1] (any equal shapes ``[...]``) -> RGB ``[..., 3]`` in [0, 1]."""
    k = torch.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0], dim=-1)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v[..., None] - (v * s)[..., None] * ramp


def _reflect(z: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Fold ``z`` into [lo, hi] like a ball bouncing between two walls."""
    span = max(hi - lo, 1e-6)
    m = torch.remainder(z - lo, 2.0 * span)
    return lo + span - (m - span).abs()


def _wrap(z: torch.Tensor, margin: float) -> torch.Tensor:
    """Wrap ``z`` into [-margin, 1 + margin): a sprite leaves one edge fully before it re-enters."""
    return torch.remainder(z + margin, 1.0 + 2.0 * margin) - margin


def _sdf(shape: str, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (about; negative inside) to ``shape`` of radius ``r`` at offsets ``u, v``.

    All in pixels; ``u`` and ``v`` may be broadcastable pieces (``[T, 1, W]`` and ``[T, H, 1]``)
    so that most operations run on the small pieces, not on the full ``[T, H, W]`` grid.
    """
    if shape == "circle":
        return torch.sqrt(u * u + v * v) - r
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.8 * r
    if shape == "triangle":
        # equilateral, pointing up (image y grows downwards): three half-planes
        return torch.maximum(u.abs() * 0.866 - v * 0.5, v) - 0.5 * r
    if shape == "diamond":
        return (u.abs() + v.abs()) * 0.7071 - 0.75 * r
    if shape == "ring":
        return (torch.sqrt(u * u + v * v) - 0.72 * r).abs() - 0.28 * r
    if shape == "cross":
        au, av = u.abs(), v.abs()
        return torch.minimum(torch.maximum(au - r, av - 0.33 * r), torch.maximum(au - 0.33 * r, av - r))
    raise ValueError(f"unknown sprite shape {shape!r}; expected one of {SHAPES}")


class SyntheticVideos(Dataset):
    """Procedural clips of moving sprites; the motion pattern is the label.

    ``dataset[i]`` -> ``dict(video=float32[3, T, H, W] in [-1, 1], label=int, index=int,
    complexity=float)``. Clip ``i`` is drawn from ``(seed, index_offset + i)``: deterministic,
    and a held-out split is the same generator at a disjoint ``index_offset``. Labels cycle
    through the classes (``label = (index_offset + i) % num_classes``) so every class appears
    in every run of ``num_classes`` consecutive clips.

    ``complexity`` is :func:`clip_complexity`: mean absolute temporal plus spatial difference
    of the channel mean, in [-1, 1] pixel units; near 0 for a flat static clip, large for a
    textured pan with six fast sprites.
    """

    class_names: tuple[str, ...] = CLASS_NAMES

    def __init__(self, num_videos: int, frames: int = 16, size: int = 64, seed: int = 0,
                 index_offset: int = 0, config: SyntheticConfig | None = None) -> None:
        if num_videos < 0:
            raise ValueError(f"num_videos must be >= 0, got {num_videos}")
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        if size < 4:
            raise ValueError(f"size must be >= 4 pixels, got {size}")
        self.num_videos = int(num_videos)
        self.frames = int(frames)
        self.size = int(size)
        self.seed = int(seed)
        self.index_offset = int(index_offset)
        self.config = config or SyntheticConfig()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.num_videos

    def label_of(self, i: int) -> int:
        """The class of clip ``i`` without drawing it."""
        return (self.index_offset + int(i)) % self.num_classes

    def video_id(self, i: int) -> str:
        """A stable name for clip ``i`` (used as the video id in token stores)."""
        return f"synthetic-s{self.seed}-{self.index_offset + int(i)}"

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.num_videos:
            raise IndexError(f"synthetic index {i} out of range [0, {self.num_videos})")
        video = self.render(i)
        return {"video": video, "label": self.label_of(i), "index": i, "complexity": clip_complexity(video)}

    # ------------------------------------------------------------------ drawing
    def render(self, i: int) -> torch.Tensor:
        """Draw clip ``i``: ``float32[3, T, H, W]`` in [-1, 1]."""
        gidx = self.index_offset + int(i)
        g = torch.Generator().manual_seed(mix_seed(self.seed, gidx))
        cfg = self.config
        cls = CLASS_NAMES[gidx % len(CLASS_NAMES)]
        T = self.frames
        # Scalars come from one tensor of uniforms read as a list: far cheaper than tensor maths.
        head = torch.rand(8, generator=g).tolist()
        n_obj = 1 + min(int(head[0] * cfg.max_objects), cfg.max_objects - 1)
        log_lo, log_hi = math.log(cfg.min_speed), math.log(cfg.max_speed)
        speed = math.exp(log_lo + head[1] * (log_hi - log_lo)) * cfg.fps_scale
        textured_bg = cls == "pan" or head[2] < cfg.textured_background_prob
        bg_dark = head[3] < 0.5

        t = torch.arange(T, dtype=torch.float32)  # [T] frame index
        # Camera offset (pan only): pixel p shows world point p + cam, so background and sprites shift together.
        if cls == "pan":
            cam_dir = head[4] * 2 * math.pi
            cam = torch.tensor([math.cos(cam_dir), math.sin(cam_dir)]) * speed * t[:, None]  # [T, 2]
        else:
            cam = None
        frame = self._background(g, textured_bg, bg_dark, cam)  # [3, T, S, S]

        sprite_u = torch.rand(n_obj, 14, generator=g).tolist()  # per-sprite uniforms, fixed order
        for p in sprite_u:
            shape = SHAPES[min(int(p[0] * len(SHAPES)), len(SHAPES) - 1)]
            if cls == "rotate" and shape in ("circle", "ring"):
                shape = "square"  # a spinning circle shows no motion
            radius = cfg.min_radius + (cfg.max_radius - cfg.min_radius) * p[1]
            ang = p[4] * 2 * math.pi
            v = speed * (0.7 + 0.6 * p[5])  # per-sprite speed near the clip's speed
            phase = p[6] * 2 * math.pi
            hue, sat = p[7], 0.55 + 0.45 * p[8]
            value = 0.75 + 0.25 * p[9] if bg_dark else 0.15 + 0.35 * p[9]
            vec = torch.tensor([radius + (1 - 2 * radius) * p[2], radius + (1 - 2 * radius) * p[3],
                                math.cos(ang), math.sin(ang), *colorsys.hsv_to_rgb(hue, sat, value)])
            pos0, direction, color = vec[0:2], vec[2:4], vec[4:7]  # start [2], unit velocity [2], rgb [3]
            striped = p[10] < cfg.textured_sprite_prob
            omega = min(v / radius, 1.2)  # angular rate whose rim speed matches the linear speed

            pos = pos0[None]  # [1, 2]: a sprite that does not move is drawn once and broadcast over time
            scale = angle = alpha = None  # None: constant (1, no rotation, opaque): cheaper to draw
            colors = color[None].expand(T, 3)  # [T, 3]
            if cls == "linear":
                pos = _wrap(pos0 + direction * v * t[:, None], radius)
            elif cls == "bounce":
                pos = _reflect(pos0 + direction * v * t[:, None], radius, 1 - radius)
            elif cls == "circular":
                orbit = 0.08 + 0.2 * p[11]
                w = v / orbit
                pos = pos0 + orbit * torch.stack([torch.cos(w * t + phase), torch.sin(w * t + phase)], -1)
            elif cls == "zoom":
                scale = torch.exp(0.6 * torch.sin(omega * 0.5 * t + phase))
            elif cls == "rotate":
                angle = phase + omega * t
            elif cls == "blink":
                alpha = torch.sigmoid(6.0 * torch.cos(omega * 0.5 * t + phase))
            elif cls == "zigzag":
                perp = torch.stack([-direction[1], direction[0]])
                amp = 0.04 + 0.06 * p[12]
                pos = _wrap(pos0 + direction * v * t[:, None]
                            + perp * amp * torch.sin(v / amp * t + phase)[:, None], radius)
            elif cls == "pan":
                pos = _wrap(pos0 - cam, radius)  # the background shows world point (pixel + cam): same shift
            elif cls == "color_cycle":
                hues = (hue + (v / radius) * 0.05 * t) % 1.0
                colors = _hsv_to_rgb(hues, torch.full((T,), 0.8), torch.full((T,), value))
            # "static": nothing changes
            self._draw_sprite(frame, shape, radius, pos, scale, angle, alpha, colors, striped)

        return frame.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)

    def _background(self, g: torch.Generator, textured: bool, dark: bool,
                    cam: torch.Tensor | None) -> torch.Tensor:
        """``float[3, T, S, S]`` in [0, 1]: a flat colour or a few oriented gratings, shifted by ``cam[T, 2]``."""
        T, S = self.frames, self.size
        p = torch.rand(4, generator=g).tolist()
        value = 0.1 + 0.25 * p[2] if dark else 0.7 + 0.25 * p[2]
        base = torch.tensor(colorsys.hsv_to_rgb(p[0], 0.3 + 0.5 * p[1], value))  # [3]
        if not textured:
            return base[:, None, None, None].expand(3, T, S, S).clone()
        n_waves = 3
        q = torch.rand(n_waves, 4, generator=g)
        freq = 2.0 + 8.0 * q[:, 0]  # cycles per frame width
        theta = q[:, 1] * math.pi
        phase = q[:, 2] * 2 * math.pi
        amp = 0.5 + 0.5 * q[:, 3]
        amp = amp / amp.sum()
        kx, ky = freq * torch.cos(theta) * 2 * math.pi, freq * torch.sin(theta) * 2 * math.pi  # [n]
        centers = (torch.arange(S, dtype=torch.float32) + 0.5) / S  # [S] pixel centres in frame units
        # a static texture (tc = 1) is drawn once and broadcast over time, a panning one per frame (tc = T)
        cx = centers[None, :] if cam is None else centers[None, :] + cam[:, 0, None]  # [tc, S]
        cy = centers[None, :] if cam is None else centers[None, :] + cam[:, 1, None]  # [tc, S]
        # sin(a + b) = sin a cos b + cos a sin b: separable in x and y, so only [tc, n, S] sines
        ax = kx[None, :, None] * cx[:, None, :] + phase[None, :, None]  # [tc, n, S] (x)
        by = ky[None, :, None] * cy[:, None, :]  # [tc, n, S] (y)
        field = torch.einsum("tny,tnx->tyx", torch.cos(by) * amp[None, :, None], torch.sin(ax)) + torch.einsum(
            "tny,tnx->tyx", torch.sin(by) * amp[None, :, None], torch.cos(ax))  # [tc, S, S] in [-1, 1]
        other = torch.tensor(colorsys.hsv_to_rgb((p[0] + 0.3 + 0.4 * p[3]) % 1.0, 0.6, float(base.max()) * 0.6 + 0.2))
        w = field.mul_(0.5).add_(0.5)[None]  # [1, tc, S, S] mix weight in [0, 1]
        out = torch.lerp(base[:, None, None, None], other[:, None, None, None], w)  # [3, tc, S, S]
        return out.expand(3, T, S, S).clone() if cam is None else out

    def _draw_sprite(self, frame: torch.Tensor, shape: str, radius: float, pos: torch.Tensor,
                     scale: torch.Tensor | None, angle: torch.Tensor | None, alpha: torch.Tensor | None,
                     colors: torch.Tensor, striped: bool) -> None:
        """Composite one sprite into ``frame[3, T, S, S]`` in place.

        ``pos[T or 1, 2]`` in frame units; ``scale``, ``angle``, ``alpha``: ``[T]`` or None
        (constant); ``colors[T, 3]``. Only the window that the sprite can touch over the whole
        clip is computed, and a sprite whose shape does not change is computed for one frame.
        """
        S = self.size
        r_px = radius * S * scale if scale is not None else torch.tensor([radius * S])  # [T or 1] pixels
        reach = float(r_px.max()) * 1.2 + 1.5  # farthest any shape reaches from its centre, plus the AA ramp
        cpx = pos * S  # [T or 1, 2] centre in pixels
        (lx, ly), (hx, hy) = cpx.amin(0).tolist(), cpx.amax(0).tolist()
        x0, x1 = _window(lx - reach, hx + reach, S)
        y0, y1 = _window(ly - reach, hy + reach, S)
        if x0 >= x1 or y0 >= y1:
            return  # entirely outside the frame
        dx = (torch.arange(x0, x1, dtype=torch.float32) + 0.5)[None, None, :] - cpx[:, 0, None, None]  # [T|1, 1, w]
        dy = (torch.arange(y0, y1, dtype=torch.float32) + 0.5)[None, :, None] - cpx[:, 1, None, None]  # [T|1, h, 1]
        if angle is not None:
            cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
            u, v = dx * cos + dy * sin, dy * cos - dx * sin  # [T, h, w] rotated offsets
        else:
            u, v = dx, dy
        r = r_px[:, None, None]  # [T or 1, 1, 1]
        cover = (0.5 - _sdf(shape, u, v, r)).clamp_(0.0, 1.0)  # [T or 1, h, w] anti-aliased coverage
        if alpha is not None:
            cover = cover * alpha[:, None, None]
        col = rearrange(colors, "t c -> c t 1 1")
        if striped:
            # stripes across the sprite's own axis, so they turn with it
            stripes = torch.sin(u * (2.5 * math.pi / r)).mul_(1.5).clamp_(-1.0, 1.0)  # [T or 1, h or 1, w]
            col = col * (0.7 - 0.3 * stripes[None])  # [3, T, h or 1, w]
        view = frame[:, :, y0:y1, x0:x1]  # [3, T, h, w]
        view.lerp_(col.expand_as(view), cover[None].expand_as(view))


def _window(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Pixel index range [a, b) covering coordinates lo..hi, clipped to the frame."""
    return max(0, int(math.floor(lo))), min(size, int(math.ceil(hi)) + 1)


def clip_complexity(video: torch.Tensor) -> float:
    """A busyness score of ``video[C, T, H, W]``: mean |temporal difference| + mean |spatial difference|.

    Measured on the channel mean (luma-like), which is a third of the work and ranks clips the same.
    """
    x = video.float().mean(0, keepdim=True)  # [1, T, H, W]
    temporal = (x[:, 1:] - x[:, :-1]).abs_().mean() if x.shape[1] > 1 else x.new_zeros(())
    spatial = 0.5 * ((x[..., 1:, :] - x[..., :-1, :]).abs_().mean() + (x[..., 1:] - x[..., :-1]).abs_().mean())
    return float(temporal + spatial)


def temporal_energy(video: torch.Tensor) -> torch.Tensor:
    """Mean |x[t+1] - x[t]| of ``video[C, T, H, W]`` or per clip of ``[B, C, T, H, W]`` (``[]`` or ``[B]``)."""
    d = (video[..., 1:, :, :] - video[..., :-1, :, :]).abs()
    return d.flatten(-4).mean(-1) if video.dim() == 5 else d.mean()
