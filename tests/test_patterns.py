import hashlib

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
    with pytest.raises(ValueError, match=r"^masks are \(112, 112\) but the vocabulary has 10752 pixels$"):
        vocab.label(np.zeros((112, 112), bool))


def test_one_pixel_mask_gets_the_cell_that_holds_it():
    """A single covered pixel is an occlusion, not "clean": its best pattern is the one grid cell around it (IoU
    1/cell area beats every larger rectangle)."""
    vocab = PatternVocabulary(112, 112, 5)  # grid lines 0, 22, 45, 67, 90, 112
    mask = np.zeros((112, 112), bool)
    mask[50, 30] = True  # row band 45-67, column band 22-45
    assert tuple(vocab.boxes[vocab.label(mask)]) == (45, 22, 67, 45)


# --- Pinned vocabulary: the shipped pattern head's logits are indexed by this order -----------------------------

def definition_lines(size: int, grid: int) -> list[int]:
    """Grid lines by the definition: i * size / K rounded half up, in exact integer arithmetic."""
    return [(2 * i * size + grid) // (2 * grid) for i in range(grid + 1)]


def definition_boxes(height: int, width: int, grid: int) -> list[tuple[int, int, int, int]]:
    """FROM's vocabulary written out from its definition (DESIGN.md, section 1), in the order the weights use.

    Index 0 is the empty pattern; then every rectangle of grid cells, its row span (r0, r1) in lexicographic
    order as the outer loop and its column span (c0, c1) in the same order as the inner one.
    """
    rows, cols = definition_lines(height, grid), definition_lines(width, grid)
    spans = [(a, b) for a in range(grid + 1) for b in range(grid + 1) if a < b]
    return [(0, 0, 0, 0)] + [(rows[r0], cols[c0], rows[r1], cols[c1]) for r0, r1 in spans for c0, c1 in spans]


#: sha256 of the (N, 4) boxes (top, left, bottom, right) as little-endian int32, in index order. Recorded from the
#: vocabulary the shipped from_sface_net weights were trained with (112x112, K = 5); never regenerate these to make
#: a failing test pass: a changed order silently scrambles every shipped pattern head.
GOLDEN_DIGESTS = {
    (112, 96, 3): (37, "0440464c763f8df3cbc9d4d3760a1f35002728f3f33760862aab8c6132e27af7"),
    (112, 96, 4): (101, "08e21f6927b0d20de632ee8647cd6a8f64e31e2c37d6db181d6608ba19c9a36c"),
    (112, 96, 5): (226, "a87af4882f1fa3347449ef56e8c8f6d4448034320b65853ad30ccc965dd81dc5"),
    (112, 96, 6): (442, "47a44ecc255e691d329329cb7b2b6808129161a66628f3f4a0277fadfbad99e8"),
    (112, 112, 3): (37, "328467462f4de55e437c9a62222e85fc680c69f4207408d1ac2472ac84553add"),
    (112, 112, 4): (101, "e20fc4fe2ceb079e30f6348350cadcc6ac37a11f7106330f6e2be75826e391ee"),
    (112, 112, 5): (226, "f5c1ff85be1796c5dba1bd0d0815daf22747d5200b64374fd69ede446c1d037e"),
    (112, 112, 6): (442, "2f62e70301395b70829ac4fed3708940fbb83c46296ab03fb83e7b80f280e904"),
}


def brute_force_label(mask: np.ndarray, boxes) -> int:
    """The argmax-IoU pattern by a plain loop over ``boxes``: exact pixel counts, IoU in float32 (the precision the
    labeller documents), the first index on ties, 0 for an empty mask. Shared with the synthesiser's tests."""
    mask = np.asarray(mask, dtype=bool)
    area = int(np.count_nonzero(mask))
    if area == 0:
        return 0
    best, best_iou = 0, np.float32(-1.0)
    for index, (top, left, bottom, right) in enumerate(boxes):
        inter = int(np.count_nonzero(mask[top:bottom, left:right]))
        union = area + (bottom - top) * (right - left) - inter
        iou = np.float32(inter) / np.float32(union)
        if iou > best_iou:
            best, best_iou = index, iou
    return best


def nearest_resize(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST written out: destination pixel i samples source pixel floor(i * (1 / (dst / src)))."""
    src_h, src_w = mask.shape
    ys = np.minimum(np.floor(np.arange(height) * (1.0 / (height / src_h))).astype(int), src_h - 1)
    xs = np.minimum(np.floor(np.arange(width) * (1.0 / (width / src_w))).astype(int), src_w - 1)
    return mask[ys][:, xs]


def frame_label(mask: np.ndarray, frame: tuple[int, int, int, int], image_shape, grid: int,
                label_size: tuple[int, int] = (112, 96)) -> int:
    """The documented label: argmax IoU over the K x K vocabulary of the true mask inside the face frame, at the
    image's own resolution when the frame is the whole image, else resized (nearest) to ``label_size``."""
    x0, y0, x1, y1 = frame
    crop = mask[y0:y1, x0:x1]
    if (x0, y0, x1, y1) == (0, 0, image_shape[1], image_shape[0]):
        return brute_force_label(crop, definition_boxes(crop.shape[0], crop.shape[1], grid))
    h, w = label_size
    return brute_force_label(nearest_resize(crop, h, w), definition_boxes(h, w, grid))


def _digest(boxes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(boxes, dtype="<i4").tobytes()).hexdigest()


@pytest.mark.parametrize("height,width,grid", sorted(GOLDEN_DIGESTS))
def test_vocabulary_order_matches_golden_digest(height, width, grid):
    count, digest = GOLDEN_DIGESTS[height, width, grid]
    vocab = PatternVocabulary(height, width, grid)
    assert num_patterns(grid) == len(vocab) == len(vocab.boxes) == count
    assert _digest(vocab.boxes) == digest
    assert _digest(pattern_boxes(height, width, grid)) == digest
    # the digest is also the definition's: the same boxes, in the same order
    assert vocab.boxes.tolist() == [list(b) for b in definition_boxes(height, width, grid)]


def test_vocabulary_literal_boxes_derived_by_hand():
    """K = 5 at 112x112 (the shipped from_sface_net head). Grid lines round(i * 112 / 5) = 0, 22, 45, 67, 90, 112.

    The 15 spans in order: (0,1) (0,2) (0,3) (0,4) (0,5) (1,2) (1,3) (1,4) (1,5) (2,3) (2,4) (2,5) (3,4) (3,5) (4,5).
    Pattern 1 + 15 * i + j has row span i and column span j: 1 -> (0,1)x(0,1); 2 -> (0,1)x(0,2);
    15 -> (0,1)x(4,5); 16 -> (0,2)x(0,1); 25 = 1 + 15 + 9 -> (0,2)x(2,3); 100 = 1 + 90 + 9 -> (1,3)x(2,3);
    225 = 1 + 210 + 14 -> (4,5)x(4,5).
    """
    expected = {0: (0, 0, 0, 0), 1: (0, 0, 22, 22), 2: (0, 0, 22, 45), 15: (0, 90, 22, 112), 16: (0, 0, 45, 22),
                25: (0, 45, 45, 67), 100: (22, 45, 67, 67), 225: (90, 90, 112, 112)}
    vocab = PatternVocabulary(112, 112, 5)
    assert grid_lines(112, 5).tolist() == [0, 22, 45, 67, 90, 112]
    for index, (top, left, bottom, right) in expected.items():
        assert tuple(vocab.boxes[index]) == (top, left, bottom, right), index
        want = np.zeros((112, 112), bool)
        want[top:bottom, left:right] = True
        assert np.array_equal(vocab.masks[index], want), index
    # 112x96 (the paper's input): column lines round(i * 96 / 5) = 0, 19, 38, 58, 77, 96
    narrow = PatternVocabulary(112, 96, 5)
    assert grid_lines(96, 5).tolist() == [0, 19, 38, 58, 77, 96]
    assert tuple(narrow.boxes[25]) == (0, 38, 45, 58) and tuple(narrow.boxes[100]) == (22, 38, 67, 58)
    assert tuple(narrow.boxes[225]) == (90, 77, 112, 96) and tuple(narrow.boxes[2]) == (0, 0, 22, 38)


@pytest.mark.parametrize("height,width,grid", [(112, 112, 5), (112, 96, 4), (37, 29, 6)])
def test_every_mask_is_exactly_its_box(height, width, grid):
    masks = patterns(height, width, grid)
    boxes = definition_boxes(height, width, grid)
    assert len(masks) == len(boxes)
    for index, (top, left, bottom, right) in enumerate(boxes):
        want = np.zeros((height, width), bool)
        want[top:bottom, left:right] = True
        assert np.array_equal(masks[index], want), index


def test_predicted_pattern_reads_the_logits_as_users_are_shown():
    from fromface.occlusion.patterns import pattern_boxes, predicted_pattern

    boxes = pattern_boxes(100, 100, 2)  # 0: clean; the others: rectangles of the 2x2 grid
    logits = np.full(len(boxes), -5.0)
    lower = next(k for k, b in enumerate(boxes) if tuple(b) == (50, 0, 100, 100))
    logits[lower], logits[0] = 3.0, 1.0
    seen = predicted_pattern(logits, boxes, 100, 100)
    prob = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert seen.pattern == lower and seen.box == (50, 0, 100, 100) and seen.visible_fraction == 0.5
    assert np.isclose(seen.probability, prob[lower]) and np.isclose(seen.occlusion_probability, 1 - prob[0])
    logits[0] = 9.0
    clean = predicted_pattern(logits, boxes, 100, 100)
    assert clean.pattern == 0 and clean.box == (0, 0, 0, 0) and clean.visible_fraction == 1.0
