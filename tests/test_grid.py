"""The sample grids of the run directory: tiling and the teacher | student layout, against hand-built arrays."""

import numpy as np
import torch

from dq.utils.grid import grid_array, side_by_side


def test_grid_array_tiles_row_by_row_on_a_white_background():
    images = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2)  # black, mid grey, white
    grid = grid_array(images, nrow=2, pad=1)
    expected = np.full((2 * 3 + 1, 2 * 3 + 1, 1), 255, dtype=np.uint8)  # 2 rows x 2 columns of 2x2 tiles, pad 1
    expected[1:3, 1:3] = 0
    expected[1:3, 4:6] = 128  # (0 + 1) * 127.5 = 127.5, rounded half to even
    expected[4:6, 1:3] = 255
    assert grid.dtype == np.uint8 and np.array_equal(grid, expected)
    assert grid_array(torch.zeros(5, 3, 4, 4)).shape == (2 * 6 + 2, 3 * 6 + 2, 3)  # default: ceil(sqrt(5)) = 3 a row


def test_side_by_side_pads_the_shorter_grid_and_keeps_both_whole():
    left = np.zeros((4, 3, 1), dtype=np.uint8)
    right = np.full((2, 5, 1), 7, dtype=np.uint8)
    both = side_by_side(left, right, gap=2)
    assert both.shape == (4, 3 + 2 + 5, 1)
    assert np.array_equal(both[:, :3], left) and (both[:, 3:5] == 255).all()
    assert np.array_equal(both[:2, 5:], right) and (both[2:, 5:] == 255).all()
