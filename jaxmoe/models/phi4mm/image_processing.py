"""NumPy reimplementation of transformers' Phi-4-multimodal image processor (`Phi4MultimodalImageProcessor`).

The reference runs on torchvision; this module reproduces its arithmetic without torch:

* `resize_uint8_bilinear_aa` is `torchvision.transforms.v2.functional.resize(uint8 CHW, [h, w])` with its defaults
  (bilinear, antialias=True) on a CPU with AVX2/AVX512 (or ARM): torchvision hands the uint8 tensor straight to
  `torch.nn.functional.interpolate`, whose uint8 kernel (a port of Pillow-SIMD) turns the separable triangle-filter
  weights into int16 fixed point, runs the horizontal pass first into a uint8 intermediate, then the vertical pass,
  each rounding as `(sum + 2**(p-1)) >> p` and saturating to 0..255. Results are bit-identical to torch.
* `resize_float_bicubic` is `interpolate(float32, mode="bicubic", align_corners=False, antialias=False)`
  (Keys cubic, A = -0.75, clamped border taps), evaluated in float32 in torch's order, `sum_y wy * (sum_x wx * src)`,
  including the fused multiply-adds of torch's x86 build. Bit-identical to torch 2.13/2.14 on x86 for almost every
  output; the rest (border outputs of strong upscales) differ by a few float32 ulps (measured max 5e-7).
* `hd_transform` is `Phi4MultimodalImageProcessor.dynamic_preprocess` + `_preprocess` for one image.
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------------------------------------------------
# Resampling kernels


def _aa_linear_int16_weights(in_size: int, out_size: int):
    """Triangle-filter (antialiased bilinear) taps for one axis as torch computes them for uint8 input.

    Returns (xmin [out], int weights [out, K], precision p). Mirrors `HelperInterpBase::_compute_weights_aa` and
    `_compute_indices_int16_weights_aa` (align_corners=False, no explicit scale factor) in double precision.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # (interp_size / 2) * scale, interp_size = 2
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    k = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    j = np.arange(k, dtype=np.int64)
    x = ((j[None, :] + xmin[:, None]) - center[:, None] + 0.5) * invscale
    x = np.abs(x)
    w = np.where(x < 1.0, 1.0 - x, 0.0)
    w[j[None, :] >= xsize[:, None]] = 0.0
    total = np.zeros(out_size)
    for t in range(k):  # sequential sum, as in C
        total = total + w[:, t]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    w_max = w.max()
    precision = 0
    while precision < 22:
        if int(0.5 + w_max * (1 << (precision + 1))) >= (1 << 15):
            break
        precision += 1
    wi = np.floor(0.5 + w * (1 << precision)).astype(np.int64)  # all weights are >= 0
    return xmin, wi, precision


def _fixed_point_pass(img: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One separable uint8 pass along `axis` (of a [C, H, W] array), int16-weight fixed point as in torch."""
    in_size = img.shape[axis]
    xmin, wi, p = _aa_linear_int16_weights(in_size, out_size)
    src = np.moveaxis(img, axis, -1)
    # int32 is exact: the weights of one output sum to about 2**p <= 2**22, times at most 255.
    acc = np.full(src.shape[:-1] + (out_size,), 1 << (p - 1), dtype=np.int32)
    wi = wi.astype(np.int32)
    for t in range(wi.shape[1]):
        if not wi[:, t].any():
            continue
        idx = np.minimum(xmin + t, in_size - 1)  # taps past the support have weight 0
        acc += src[..., idx] * wi[:, t]
    out = np.clip(acc >> p, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def resize_uint8_bilinear_aa(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch `interpolate(uint8 [C, H, W], (out_h, out_w), mode="bilinear", antialias=True)` on CPU, bit-exact."""
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"expected a uint8 [C, H, W] array, got {img.dtype} {img.shape}")
    _, h, w = img.shape
    if (h, w) == (out_h, out_w):
        return img.copy()
    out = img
    if w != out_w:
        out = _fixed_point_pass(out, 2, out_w)
    if h != out_h:
        out = _fixed_point_pass(out, 1, out_h)
    return out


def _fma(a, b, c):
    """float32 fused multiply-add (float64 holds the exact product of two float32 values)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _cubic_taps(in_size: int, out_size: int):
    """Bicubic (A = -0.75) source indices [out, 4] and float32 weights [out, 4], torch `HelperInterpCubic` style."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    # torch's CPU kernels are built with FMA contraction: real = fma(scale, i + 0.5, -0.5), one float32 rounding
    # (the float64 product and difference below are exact, so this is that single rounding).
    real = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    idx = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    lam = np.clip(real - idx.astype(np.float32), f32(0.0), f32(1.0)).astype(np.float32)
    a = f32(-0.75)

    def conv1(x):  # |x| <= 1
        return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)

    def conv2(x):  # 1 < |x| < 2; torch's build fuses the two inner multiply-adds
        return _fma(_fma(a, x, -f32(5) * a), x, f32(8) * a) * x - f32(4) * a

    x2 = f32(1.0) - lam
    w = np.stack([conv2(lam + f32(1.0)), conv1(lam), conv1(x2), conv2(x2 + f32(1.0))], axis=1).astype(np.float32)
    taps = np.clip(idx[:, None] - 1 + np.arange(4)[None, :], 0, in_size - 1)
    return taps, w


def resize_float_bicubic(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch `interpolate(float32 [C, H, W], (out_h, out_w), mode="bicubic", align_corners=False, antialias=False)`."""
    img = np.asarray(img, dtype=np.float32)
    _, h, w = img.shape
    if (h, w) == (out_h, out_w):
        return img.copy()
    tx, wx = _cubic_taps(w, out_w)
    ty, wy = _cubic_taps(h, out_h)
    # torch: out = sum_j wy_j * (sum_i wx_i * src), each sum `t0*w0 + t1*w1 + t2*w2 + t3*w3` compiled with FMA
    # contraction as fma(t3, w3, fma(t2, w2, fma(t0, w0, t1 * w1))).
    rows = img[:, :, tx[:, 1]] * wx[:, 1]  # [C, H, out_w]
    for t in (0, 2, 3):
        rows = _fma(img[:, :, tx[:, t]], wx[:, t], rows)
    out = rows[:, ty[:, 1], :] * wy[:, 1, None]
    for t in (0, 2, 3):
        out = _fma(rows[:, ty[:, t], :], wy[:, t, None], out)
    return out


# --------------------------------------------------------------------------------------------------------------------
# HD transform (dynamic crops)


def _find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def crop_plan(orig_height: int, orig_width: int, image_size: int, max_num: int, min_num: int = 1):
    """(crop grid (w_crops, h_crops), resized (width, height), padding (width, height)) as transformers computes."""
    w_crop_num = math.ceil(orig_width / float(image_size))
    h_crop_num = math.ceil(orig_height / float(image_size))
    if w_crop_num * h_crop_num > max_num:
        aspect_ratio = orig_width / orig_height
        target_ratios = {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        }
        target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])  # stable: set order breaks ties, as upstream
        grid = _find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    else:
        grid = (w_crop_num, h_crop_num)
    target_width, target_height = image_size * grid[0], image_size * grid[1]
    ratio_width = target_width / orig_width
    ratio_height = target_height / orig_height
    if ratio_width < ratio_height:
        new_size = (target_width, int(orig_height * ratio_width))
        padding = (0, target_height - int(orig_height * ratio_width))
    else:
        new_size = (int(orig_width * ratio_height), target_height)
        padding = (target_width - int(orig_width * ratio_height), 0)
    return grid, new_size, padding


def hd_transform(image: np.ndarray, size: int, patch_size: int, dynamic_hd: int, mean, std, index: int = 0):
    """One uint8 [H, W, 3] image -> (crops [1 + n, 3, size, size] float32, mask [1 + n, size / patch_size,
    size / patch_size] float32, (hd_height, hd_width)): the global view, then the n tiles row-major."""
    orig_height, orig_width = image.shape[:2]
    mask_size = size // patch_size
    grid, new_size, (pad_w, pad_h) = crop_plan(orig_height, orig_width, size, dynamic_hd)
    target_width, target_height = size * grid[0], size * grid[1]
    if min(new_size[1], target_height) < 10 or min(new_size[0], target_width) < 10:
        raise ValueError(
            f"image {index} (height x width {orig_height}x{orig_width}) has too extreme an aspect ratio: fitting it "
            f"into a {grid[0]}x{grid[1]} grid of {size}-pixel crops would resize it to {new_size[0]}x{new_size[1]} "
            "(width x height), under 10 pixels on one side (transformers raises 'the aspect ratio is very extreme'). "
            "Pad or crop the image to a less elongated shape first.")

    attention_mask = np.ones((mask_size * grid[1], mask_size * grid[0]), dtype=np.float32)
    if pad_w >= patch_size:
        attention_mask[:, -math.floor(pad_w / patch_size):] = 0
    if pad_h >= patch_size:
        attention_mask[-math.floor(pad_h / patch_size):, :] = 0

    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    resized = resize_uint8_bilinear_aa(chw, new_size[1], new_size[0])
    hd = np.full((3, target_height, target_width), 255, dtype=np.uint8)
    hd[:, : new_size[1], : new_size[0]] = resized

    processed = (hd.astype(np.float32) - mean[:, None, None]) / std[:, None, None]
    global_image = resize_float_bicubic(processed, size, size)

    h_crops, w_crops = target_height // size, target_width // size
    tiles = processed.reshape(3, h_crops, size, w_crops, size).transpose(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
    mask_tiles = attention_mask.reshape(h_crops, mask_size, w_crops, mask_size).transpose(0, 2, 1, 3)
    mask_tiles = mask_tiles.reshape(-1, mask_size, mask_size)

    crops = np.concatenate([global_image[None], tiles], axis=0)
    masks = np.concatenate([np.ones((1, mask_size, mask_size), np.float32), mask_tiles], axis=0)
    return crops, masks, (target_height, target_width)
