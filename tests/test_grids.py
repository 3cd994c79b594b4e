import numpy as np
import pytest
import torch

from diffrl.grids import LABEL_WIDTH, labelled_grid


def test_a_labelled_grid_holds_every_image_enlarged_with_its_prompt_and_score():
    generator = torch.Generator().manual_seed(0)
    ode, sde = torch.rand(3, 3, 32, 32, generator=generator), torch.rand(3, 3, 32, 32, generator=generator)
    prompts = ["a red circle", "three blue squares left of a green triangle", "two yellow triangles"]
    grid = labelled_grid(
        [("ODE (eta 0)", ode), ("training sampler: eta 1, stochastic steps 0-1 of 20", sde)],
        prompts,
        [torch.tensor([0.25, 0.5, 1.0]), None],
    )
    tile, pad = 128, 2  # 32 px images are enlarged 4x
    assert grid.dtype == np.uint8 and grid.shape[1] == LABEL_WIDTH + 3 * (tile + pad)
    expected = (sde[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    top, left = tile + pad, LABEL_WIDTH + tile + pad
    shown = grid[top : top + tile, left : left + tile]
    np.testing.assert_array_equal(shown[::4, ::4], expected)  # the second row carries no score: the image, whole
    # the first row's tiles carry their score in the top-left corner (white on black), the image elsewhere
    corner = grid[0:14, LABEL_WIDTH : LABEL_WIDTH + 30]
    assert (corner == 0).all(axis=2).any() and (corner > 200).all(axis=2).any()
    below = grid[2 * (tile + pad) :, LABEL_WIDTH:]
    assert (below < 128).any()  # prompts are written under the columns
    assert (grid[:, :LABEL_WIDTH] < 128).any()  # and the samplers left of the rows


def test_a_grid_needs_an_image_for_every_prompt():
    with pytest.raises(ValueError, match="an image per prompt"):
        labelled_grid([("ODE", torch.rand(1, 3, 8, 8))], ["a", "b"])
    with pytest.raises(ValueError, match="at least one row"):
        labelled_grid([], ["a"])
