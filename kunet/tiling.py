"""Tile grids: where the tiles that cover one side (one axis) of an image or a volume start.

Shared by overlap-tile inference (:func:`kunet.inference.predict_tiled`, tiles overlapping by a
stride shorter than the tile) and the validation tiles of :class:`kunet.data.TileDataset`
(:func:`kunet.augment.grid_crops`, a stride of one tile).
"""

from __future__ import annotations

__all__ = ["tile_starts"]


def tile_starts(length, tile, stride):
    """Start offsets of tiles of ``tile`` covering ``length`` (last one flush with the end)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts
