import math

import pytest
import torch
import torch.nn.functional as F

from fromface.models.heads import ArcFace, CosFace
from fromface.models.outputs import FaceOutput
from fromface.training.loss import FromLoss


def _hand_cosines(emb, weight):
    rows = []
    for e in emb:
        rows.append([float(e @ w / (e.norm() * w.norm())) for w in weight])
    return torch.tensor(rows)


def test_cosface_matches_hand_computation():
    torch.manual_seed(0)
    head = CosFace(4, 3, scale=30.0, margin=0.35)
    emb = torch.randn(2, 4)
    labels = torch.tensor([2, 0])
    cos = _hand_cosines(emb, head.weight.detach())
    expected = cos.clone()
    expected[0, 2] -= 0.35
    expected[1, 0] -= 0.35
    torch.testing.assert_close(head(emb, labels), 30.0 * expected, atol=1e-5, rtol=1e-5)


def test_arcface_matches_hand_computation():
    torch.manual_seed(1)
    head = ArcFace(4, 3, scale=64.0, margin=0.5)
    emb = torch.randn(2, 4)
    labels = torch.tensor([1, 1])
    cos = _hand_cosines(emb, head.weight.detach())
    expected = cos.clone()
    for i in range(2):
        theta = math.acos(cos[i, 1])
        if theta + 0.5 < math.pi:
            expected[i, 1] = math.cos(theta + 0.5)
        else:
            expected[i, 1] = cos[i, 1] - math.sin(math.pi - 0.5) * 0.5
    torch.testing.assert_close(head(emb, labels), 64.0 * expected, atol=1e-4, rtol=1e-4)


def test_arcface_is_finite_at_the_extremes():
    head = ArcFace(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)  # cos = +1 and -1 to class 0
    logits = head(emb, torch.tensor([0, 0]))
    F.cross_entropy(logits, torch.tensor([0, 0])).backward()
    assert torch.isfinite(logits).all() and torch.isfinite(emb.grad).all()
    # monotonic fallback: the target logit for cos = -1 is below the one for cos = +1
    assert logits[1, 0] < logits[0, 0]


def test_from_loss_combines_named_parts():
    torch.manual_seed(0)
    loss = FromLoss(8, 4, pattern_weight=0.5)
    out = FaceOutput(embedding=torch.randn(3, 8), pattern_logits=torch.randn(3, 10))
    labels, patterns = torch.tensor([0, 1, 3]), torch.tensor([0, 9, 4])
    parts = loss(out, labels, patterns)
    expected_margin = F.cross_entropy(loss.classifier(out.embedding, labels), labels)
    torch.testing.assert_close(parts["margin"], expected_margin)
    torch.testing.assert_close(parts["pattern"], F.cross_entropy(out.pattern_logits, patterns))
    torch.testing.assert_close(parts["total"], parts["margin"] + 0.5 * parts["pattern"])
    plain = loss(FaceOutput(embedding=out.embedding), labels)
    assert set(plain) == {"margin", "total"}


def test_from_loss_without_margin_trains_no_classifier():
    torch.manual_seed(0)
    loss = FromLoss(8, 4, margin_weight=0.0, consistency_weight=2.0)
    emb = torch.randn(3, 8, requires_grad=True)
    target = torch.randn(3, 8)
    parts = loss(FaceOutput(embedding=emb, pattern_logits=torch.randn(3, 10)), torch.tensor([0, 1, 3]),
                 torch.tensor([0, 9, 4]), target)
    assert "margin" not in parts
    expected = 1.0 - F.cosine_similarity(emb, target, dim=1).mean()
    torch.testing.assert_close(parts["consistency"], expected)
    torch.testing.assert_close(parts["total"], parts["pattern"] + 2.0 * parts["consistency"])
    assert not any(p.requires_grad for p in loss.classifier.parameters())


def test_mask_loss_targets_the_pattern_rectangle():
    from fromface.occlusion.patterns import patterns

    loss = FromLoss(8, 4, margin_weight=0.0, pattern_weight=0.0, mask_weight=0.5, grid=5)
    labels = torch.tensor([0, 37, 200])  # clean, then two rectangles of the 5x5 grid
    visible = 1.0 - torch.tensor(patterns(10, 10, 5))[labels].float()
    emb = torch.randn(3, 8)

    def parts_for(mask: torch.Tensor) -> dict:
        out = FaceOutput(embedding=emb, mask=mask[:, None].expand(3, 6, 10, 10), pattern_logits=torch.randn(3, 226))
        return loss(out, torch.tensor([0, 1, 2]), labels)

    right = parts_for(visible * 0.98 + 0.01)
    flat = parts_for(torch.full((3, 10, 10), 0.9))
    inverted = parts_for((1 - visible) * 0.98 + 0.01)
    assert right["mask"] < 0.05 < flat["mask"] < inverted["mask"]
    torch.testing.assert_close(right["total"], 0.5 * right["mask"])
    grad_mask = torch.full((3, 10, 10), 0.9, requires_grad=True)
    parts_for(grad_mask)["total"].backward()
    assert (grad_mask.grad[1][visible[1] == 0] > 0).all()  # occluded cells are pushed down
    assert (grad_mask.grad[0] < 0).all()  # a clean face's mask is pushed up everywhere
    with pytest.raises(ValueError, match="grid"):
        FromLoss(8, 4, mask_weight=1.0)


def test_mask_loss_with_the_occluder_as_truth_follows_its_pixels():
    """mask_truth="occluder": the truth is 1 - the occluder's coverage of each mask cell, averaged down from pixels."""
    loss = FromLoss(8, 4, margin_weight=0.0, pattern_weight=0.0, mask_weight=1.0, mask_truth="occluder")
    covered = torch.zeros(2, 40, 40)  # pixels; the mask is 10x10, so each cell is 4x4 pixels
    covered[1, 20:40, 0:40] = 1.0  # the lower half
    covered[1, 8:10, 0:4] = 1.0  # half of cell (2, 0)
    visible = torch.ones(2, 10, 10)
    visible[1, 5:] = 0.0
    visible[1, 2, 0] = 0.5
    emb, labels = torch.randn(2, 8), torch.tensor([0, 1])

    def mask_term(mask: torch.Tensor) -> torch.Tensor:
        out = FaceOutput(embedding=emb, mask=mask[:, None].expand(2, 3, 10, 10), pattern_logits=torch.randn(2, 226))
        return loss(out, labels, torch.tensor([0, 5]), covered=covered)["mask"]

    right = mask_term(visible.clamp(0.01, 0.99))
    upper_cell_ignored = visible.clone()
    upper_cell_ignored[1, 2, 0] = 0.99
    assert right < mask_term(upper_cell_ignored.clamp(0.01, 0.99)) < mask_term(torch.full((2, 10, 10), 0.9))
    grad_mask = torch.full((2, 10, 10), 0.7, requires_grad=True)
    mask_term(grad_mask).backward()
    assert (grad_mask.grad[1, 5:] > 0).all() and (grad_mask.grad[1, :2] < 0).all() and (grad_mask.grad[0] < 0).all()
    assert grad_mask.grad[1, 2, 0] > 0  # half covered: 0.7 is above its truth of 0.5
    pattern_only = FromLoss(8, 4, margin_weight=0.0, pattern_weight=0.0, mask_weight=1.0, grid=5)
    out = FaceOutput(embedding=emb, mask=torch.full((2, 1, 10, 10), 0.9), pattern_logits=torch.randn(2, 226))
    assert "mask" not in loss(out, labels, torch.tensor([0, 5]))  # no coverage given: no term, never a wrong one
    assert "mask" in pattern_only(out, labels, torch.tensor([0, 5]), covered=covered)
    with pytest.raises(ValueError, match="mask_truth"):
        FromLoss(8, 4, mask_weight=1.0, mask_truth="box")
