import numpy as np
import pytest

from fromface.occlusion import PatternVocabulary, label_patterns, num_patterns, patterns
from fromface.occlusion.patterns import grid_lines, pattern_boxes


@pytest.mark.parametrize("grid,count", [(3, 37), (4, 101), (5, 226), (6, 442)])
def test_pattern_counts(grid, count):
    assert num_patterns(grid) == count
    masks = patterns(112, 96, grid)
    assert masks.shape == (count, 112, 96)
    assert not masks[0].any()
    # every pattern is distinct and non-empty apart from pattern 0
    flat = masks.reshape(count, -1)
    assert len({m.tobytes() for m in flat}) == count
    assert flat[1:].any(axis=1).all()


def test_grid_lines_reach_the_border_exactly():
    for size in (96, 112, 150):
        for grid in (3, 4, 5, 6):
            lines = grid_lines(size, grid)
            assert lines[0] == 0 and lines[-1] == size
            assert np.all(np.diff(lines) > 0)


def test_full_image_pattern_covers_every_pixel():
    masks = patterns(112, 96, 5)
    full = np.where(masks.reshape(len(masks), -1).all(axis=1))[0]
    assert len(full) == 1


def test_box_covering_one_grid_rectangle_gets_it():
    vocab = PatternVocabulary(112, 96, 5)
    for index in (1, 17, 100, 225):
        top, left, bottom, right = vocab.boxes[index]
        mask = np.zeros((112, 96), bool)
        mask[top:bottom, left:right] = True
        assert vocab.label(mask) == index


def test_bottom_right_cell_includes_last_row_and_column():
    rows, cols = grid_lines(112, 5), grid_lines(96, 5)
    mask = np.zeros((112, 96), bool)
    mask[rows[4]:, cols[4]:] = True
    vocab = PatternVocabulary(112, 96, 5)
    label = vocab.label(mask)
    assert vocab.masks[label][111, 95]
    assert np.array_equal(vocab.masks[label], mask)


def test_empty_mask_is_label_zero_and_batch_matches_single():
    vocab = PatternVocabulary(112, 96, 4)
    rng = np.random.default_rng(0)
    batch = np.zeros((6, 112, 96), bool)
    for i in range(1, 6):
        top, left = rng.integers(0, 80), rng.integers(0, 60)
        batch[i, top:top + rng.integers(5, 30), left:left + rng.integers(5, 30)] = True
    labels = vocab.label(batch)
    assert labels[0] == 0
    assert all(labels[i] == vocab.label(batch[i]) for i in range(6))
    assert np.array_equal(labels, label_patterns(batch, patterns(112, 96, 4)))


def test_label_is_argmax_iou_by_brute_force():
    vocab = PatternVocabulary(40, 30, 3)
    mask = np.zeros((40, 30), bool)
    mask[5:27, 3:18] = True
    ious = [(m & mask).sum() / (m | mask).sum() for m in vocab.masks]
    assert vocab.label(mask) == int(np.argmax(ious))


def test_boxes_and_masks_agree():
    masks = patterns(50, 40, 4)
    for mask, (top, left, bottom, right) in zip(masks, pattern_boxes(50, 40, 4)):
        assert mask.sum() == (bottom - top) * (right - left)


def test_mismatched_sizes_are_rejected():
    vocab = PatternVocabulary(112, 96, 3)
    with pytest.raises(ValueError, match="vocabulary"):
        vocab.label(np.zeros((112, 112), bool))
