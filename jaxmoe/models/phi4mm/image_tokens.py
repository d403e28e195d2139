"""How many tokens an image takes in Phi-4-multimodal's prompt, and which feature each one is.

One layout for both sides, so that they always agree: `Phi4MMProcessor.images` counts an image's placeholders
(`num_img_tokens`) with it, and `ImageEmbedding` (models/phi4mm/vision.py) assembles its feature rows with it.
It holds for every crop size and patch size: with p = crop_size / patch_size patches a side, 2x2 token
compression leaves m = ceil(p / 2) tokens a side (an odd grid is padded by one first), and an image of
rows x cols tiles whose valid area covers h x w compressed tokens takes

    h * w + h        its tiles' valid tokens, one separator after each row
    + 1              the global separator
    + m * (m + 1)    the global view, one separator after each row

tokens (545 for one 448 x 448 image with 14-pixel patches: 16 * 16 + 16 + 1 + 16 * 17). NumPy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GLOBAL_SEPARATOR", "ROW_SEPARATOR", "image_token_sources", "num_image_tokens"]

# Token sources that are not crop features: the separator after each row, and the one between tiles and global.
ROW_SEPARATOR, GLOBAL_SEPARATOR = -1, -2


def image_token_sources(image_sizes: np.ndarray, image_attention_mask: np.ndarray, crop_size: int
                        ) -> list[np.ndarray]:
    """Per image, int64 [tokens]: where each of its tokens comes from, in prompt order.

    image_sizes int [images, 2] (height, width of each HD canvas, whole crops); image_attention_mask
    [images, crops, p, p] 0/1 patch masks, crop 0 the global view, then the tiles row-major (an image with
    fewer tiles than the batch's most has padding crops at the end). A source c * m^2 + r * m + k is crop c's
    compressed token (r, k); ROW_SEPARATOR and GLOBAL_SEPARATOR are the separators. Order (transformers'
    `sub_glb`): the tiles' token grid trimmed to its valid area with a separator after each row, the global
    separator, then the global view's grid with a separator after each row. Raises ValueError for arrays that
    do not fit these shapes."""
    sizes, mask = np.asarray(image_sizes), np.asarray(image_attention_mask)
    if mask.ndim != 4 or mask.shape[2] != mask.shape[3] or mask.shape[2] < 1 or mask.shape[1] < 2:
        raise ValueError(f"image_attention_mask has shape {mask.shape}; expected [images, crops >= 2, p, p] (a "
                         "global view and at least one tile per image, p = crop size / patch size patches a side)")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("image_attention_mask holds values other than 0 and 1; expected a patch mask "
                         "(1 = real patch, 0 = padding)")
    if sizes.shape != (mask.shape[0], 2) or not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"image_sizes is {sizes.dtype} {sizes.shape}; expected integers [{mask.shape[0]}, 2] "
                         "(height, width of each HD-resized image), one row per image of image_attention_mask")
    mask = mask.astype(bool)
    crops, m = mask.shape[1], (mask.shape[2] + 1) // 2
    per_crop = m * m
    grid = np.arange(per_crop).reshape(m, m)
    global_part = np.concatenate([grid, np.full((m, 1), ROW_SEPARATOR)], axis=1).reshape(-1)
    sources = []
    for i, (height, width) in enumerate(sizes.tolist()):
        rows, cols = height // crop_size, width // crop_size
        if rows < 1 or cols < 1 or 1 + rows * cols > crops:
            raise ValueError(f"image {i}: image_sizes ({height}, {width}) make a {rows} x {cols} grid of "
                             f"{crop_size}-pixel tiles; expected at least 1 x 1 and at most {crops - 1} "
                             "tiles (the crops given after the global view)")
        # Compressed token (r, k) of a tile covers patch (2r, 2k): the 2x-subsampled mask marks the valid tokens.
        tiles = mask[i, 1:1 + rows * cols, 0::2, 0::2].reshape(rows, cols, m, m)
        tiles = tiles.transpose(0, 2, 1, 3).reshape(rows * m, cols * m)
        useful_h, useful_w = int(tiles[:, 0].sum()), int(tiles[0, :].sum())
        r, k = np.meshgrid(np.arange(useful_h), np.arange(useful_w), indexing="ij")
        sub = (1 + (r // m) * cols + k // m) * per_crop + (r % m) * m + k % m
        sub = np.concatenate([sub, np.full((useful_h, 1), ROW_SEPARATOR)], axis=1).reshape(-1)
        sources.append(np.concatenate([sub, [GLOBAL_SEPARATOR], global_part]).astype(np.int64))
    return sources


def num_image_tokens(image_sizes: np.ndarray, image_attention_mask: np.ndarray, crop_size: int) -> list[int]:
    """Tokens each image takes (its image placeholders in the prompt), for the arrays of `image_token_sources`."""
    return [len(s) for s in image_token_sources(image_sizes, image_attention_mask, crop_size)]
