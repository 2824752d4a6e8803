"""frequency.py against independent derivations (numpy FFTs, explicit loops over pixels and patches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_mfm.frequency import (
    FrequencyLoss,
    filter_frequencies,
    high_pass_mask,
    low_pass_mask,
    masked_frequency_loss,
    sample_frequency_masks,
)


def brute_force_low_pass(h: int, w: int, r1: float, r2: float | None) -> np.ndarray:
    mask = np.ones((h, w))
    for y in range(h):
        for x in range(w):
            d2 = (y - h // 2) ** 2 + (x - w // 2) ** 2
            if d2 >= r1**2 and (r2 is None or d2 < r2**2):
                mask[y, x] = 0
    return mask


@pytest.mark.parametrize("h,w,r1,r2", [(32, 32, 4, None), (33, 20, 3, 7), (224, 224, 16, 999), (16, 24, 2.5, None)])
def test_low_pass_mask_matches_definition(h, w, r1, r2):
    np.testing.assert_array_equal(low_pass_mask(h, w, r1, r2).numpy(), brute_force_low_pass(h, w, r1, r2))
    np.testing.assert_array_equal(high_pass_mask(h, w, r1, r2).numpy(), 1 - brute_force_low_pass(h, w, r1, r2))


def test_low_pass_mask_keeps_centre_and_counts_disc():
    mask = low_pass_mask(64, 64, 5)
    assert mask[32, 32] == 1 and mask[0, 0] == 0
    # lattice points strictly inside radius 5 around the centre: 81 (Gauss circle count for r² < 25)
    assert int(mask.sum()) == sum(1 for y in range(-5, 6) for x in range(-5, 6) if y * y + x * x < 25)
    assert mask.dtype == torch.float32
    assert low_pass_mask(8, 8, 2, dtype=torch.bool).dtype == torch.bool


@pytest.mark.parametrize("kwargs", [dict(radius=0), dict(radius=4, outer_radius=4), dict(radius=-1)])
def test_low_pass_mask_rejects_bad_radii(kwargs):
    with pytest.raises(ValueError, match="radius"):
        low_pass_mask(8, 8, **kwargs)


def numpy_filter(images: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Independent: numpy FFT, centre by rolling (fftshift == roll by N//2), filter, roll back, inverse."""
    h, w = images.shape[-2:]
    spec = np.fft.fft2(images.astype(np.float64))
    centred = np.roll(spec, (h // 2, w // 2), axis=(-2, -1)) * keep
    back = np.roll(centred, (-(h // 2), -(w // 2)), axis=(-2, -1))
    return np.fft.ifft2(back).real


@pytest.mark.parametrize("size", [(32, 32), (31, 20)])
def test_filter_frequencies_matches_numpy(size):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, *size, generator=g)
    keep = torch.stack([low_pass_mask(*size, 4), high_pass_mask(*size, 4), low_pass_mask(*size, 2, 6)])
    ours = filter_frequencies(images, keep)
    expected = np.clip(numpy_filter(images.numpy(), keep.numpy()[:, None]), 0, 1)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6)
    # broadcast forms of the same masks give the same result
    torch.testing.assert_close(filter_frequencies(images, keep[:, None]), ours)
    torch.testing.assert_close(filter_frequencies(images[:1], keep[0]), ours[:1])


@pytest.mark.parametrize("size", [(16, 16), (15, 10), (9, 7)])
def test_filter_frequencies_with_an_asymmetric_mask_keeps_the_real_part(size):
    # the real-input FFTs see only the part of the mask symmetric under k -> -k: the real part of the full
    # complex result must come out for any mask, also for odd sizes (no Nyquist row or column)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, *size, generator=g)
    keep = (torch.rand(2, *size, generator=g) > 0.5).float()
    assert not torch.equal(keep, keep.flip(-2, -1))
    expected = np.clip(numpy_filter(images.numpy(), keep.numpy()[:, None]), 0, 1)
    np.testing.assert_allclose(filter_frequencies(images, keep).numpy(), expected, atol=1e-6)


def test_all_ones_mask_is_identity_up_to_clamping():
    images = torch.rand(2, 3, 16, 16) * 1.4 - 0.2  # some values outside [0, 1]
    out = filter_frequencies(images, torch.ones(16, 16))
    torch.testing.assert_close(out, images.clamp(0, 1), atol=1e-6, rtol=0)


def test_low_and_high_pass_parts_add_up_to_the_original_spectrum():
    images = torch.rand(2, 3, 24, 24, dtype=torch.float64).numpy()
    low = low_pass_mask(24, 24, 5).numpy()
    low_part = numpy_filter(images, low)
    high_part = numpy_filter(images, 1 - low)
    np.testing.assert_allclose(low_part + high_part, images, atol=1e-12)
    # the low-pass part of our (clamped) filter is the clamped low part
    ours = filter_frequencies(torch.from_numpy(images).float(), torch.from_numpy(low))
    np.testing.assert_allclose(ours.numpy(), np.clip(low_part, 0, 1), atol=1e-6)


def test_filter_frequencies_under_bf16_autocast_runs_in_float32():
    images = torch.rand(2, 3, 32, 32)
    keep = low_pass_mask(32, 32, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = filter_frequencies(images, keep)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, filter_frequencies(images, keep))
    half = filter_frequencies(images.bfloat16(), keep)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


def test_filter_frequencies_rejects_bad_shapes():
    with pytest.raises(ValueError, match="keep mask"):
        filter_frequencies(torch.rand(2, 3, 8, 8), torch.ones(4, 4))
    with pytest.raises(ValueError, match="batch"):
        filter_frequencies(torch.rand(2, 3, 8, 8), torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        filter_frequencies(torch.rand(3, 8, 8), torch.ones(8, 8))


def test_sample_frequency_masks_selects_per_image():
    keep = low_pass_mask(8, 8, 2)
    masks = sample_frequency_masks(3, torch.tensor([True, False, True]), keep)
    torch.testing.assert_close(masks[0], keep)
    torch.testing.assert_close(masks[1], 1 - keep)
    torch.testing.assert_close(masks[2], keep)


# ---------------------------------------------------------------- the frequency loss, against a direct formula


def direct_loss(pred, target, *, gamma=1.0, matrix_gamma=1.0, pf=1, ave=False, with_matrix=False, log=False,
                batch_matrix=False, matrix=None) -> np.ndarray:
    """Loops over patches; numpy orthonormal FFT centred by rolling; weights as Focal Frequency Loss defines them."""
    pred, target = pred.double().numpy(), target.double().numpy()
    b, c, h, w = pred.shape
    ph, pw = h // pf, w // pf

    def spectra(x):
        out = np.zeros((b, pf * pf, c, ph, pw), dtype=complex)
        for i in range(pf):
            for j in range(pf):
                patch = x[:, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
                f = np.fft.fft2(patch) / np.sqrt(ph * pw)
                out[:, i * pf + j] = np.roll(f, (ph // 2, pw // 2), axis=(-2, -1))
        return out

    fp, ft = spectra(pred), spectra(target)
    if ave:
        fp, ft = fp.mean(0, keepdims=True), ft.mean(0, keepdims=True)
    dist = np.abs(fp - ft)
    loss = np.sqrt(dist**2 + 1e-12) ** gamma
    if with_matrix:
        if matrix is not None:
            weight = matrix.double().numpy()
        else:
            weight = dist**matrix_gamma
            if log:
                weight = np.log(weight + 1)
            if batch_matrix:
                weight = weight / weight.max()
            else:
                weight = weight / weight.max(axis=(-2, -1), keepdims=True)
            weight = np.clip(np.nan_to_num(weight), 0, 1)
        loss = weight * loss
    return loss


LOSS_OPTIONS = [
    dict(),
    dict(loss_gamma=2.0),
    dict(patch_factor=2),
    dict(ave_spectrum=True),
    dict(with_matrix=True),
    dict(with_matrix=True, matrix_gamma=0.5, log_matrix=True),
    dict(with_matrix=True, batch_matrix=True),
    dict(with_matrix=True, patch_factor=2, loss_gamma=1.5),
]


@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_frequency_loss_matches_direct_formula(options):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
    ours = FrequencyLoss(**options)(pred, target)
    expected = direct_loss(
        pred, target, gamma=options.get("loss_gamma", 1.0), matrix_gamma=options.get("matrix_gamma", 1.0),
        pf=options.get("patch_factor", 1), ave=options.get("ave_spectrum", False),
        with_matrix=options.get("with_matrix", False), log=options.get("log_matrix", False),
        batch_matrix=options.get("batch_matrix", False),
    )
    assert ours.dtype == torch.float32 and tuple(ours.shape) == expected.shape
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_frequency_loss_predefined_matrix_and_gradient():
    pred = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randn(2, 3, 8, 8)
    matrix = torch.rand(2, 1, 3, 8, 8)
    ours = FrequencyLoss(with_matrix=True)(pred, target, matrix=matrix)
    np.testing.assert_allclose(ours.detach().numpy(), direct_loss(pred.detach(), target, with_matrix=True,
                                                                  matrix=matrix), rtol=1e-4, atol=1e-6)
    ours.mean().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("size", [(9, 7), (12, 10), (10, 11)])
def test_frequency_loss_on_odd_and_uneven_sizes(size):
    # the loss rebuilds the columns right of W // 2 from the real-input FFT's half spectrum: odd and even widths
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(2, 3, *size, generator=g), torch.randn(2, 3, *size, generator=g)
    for options in (dict(), dict(with_matrix=True, loss_gamma=2.0)):
        expected = direct_loss(pred, target, gamma=options.get("loss_gamma", 1.0),
                               with_matrix=options.get("with_matrix", False))
        np.testing.assert_allclose(FrequencyLoss(**options)(pred, target).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_frequency_loss_gradient_matches_the_full_complex_spectrum():
    # the gradient through the half spectrum and its mirrored columns against the plain complex FFT of every
    # frequency in float64 (a weighted sum, so every frequency's gradient counts)
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(2, 3, 12, 9, generator=g), torch.randn(2, 3, 12, 9, generator=g)
    weights = torch.rand(2, 1, 3, 12, 9, generator=g)
    pred.requires_grad_(True)
    (FrequencyLoss(loss_gamma=1.5)(pred, target) * weights).sum().backward()
    reference = pred.detach().double().requires_grad_(True)
    spectrum = torch.fft.fftshift(torch.fft.fft2(reference - target.double(), norm="ortho"), dim=(-2, -1))
    ((spectrum.abs() ** 2 + 1e-12) ** 0.75 * weights[:, 0].double()).sum().backward()
    torch.testing.assert_close(pred.grad.double(), reference.grad, rtol=1e-4, atol=1e-6)


def test_frequency_loss_is_float32_under_autocast():
    pred, target = torch.randn(2, 3, 8, 8).bfloat16(), torch.randn(2, 3, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FrequencyLoss()(pred, target)
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.numpy(), direct_loss(pred.float(), target.float()), rtol=1e-4, atol=1e-6)


def test_masked_reduction_matches_explicit_sum():
    g = torch.Generator().manual_seed(2)
    loss = torch.rand(3, 1, 3, 8, 8, generator=g)
    keep = (torch.rand(3, 8, 8, generator=g) > 0.5).float()
    total, count = 0.0, 0
    for b in range(3):
        for y in range(8):
            for x in range(8):
                if keep[b, y, x] == 0:
                    total += loss[b, 0, :, y, x].sum().item()
                    count += 1
    expected = total / count / 3
    assert masked_frequency_loss(loss, keep).item() == pytest.approx(expected, rel=1e-5)
    assert masked_frequency_loss(loss, keep[:, None]).item() == pytest.approx(expected, rel=1e-5)


def test_masked_reduction_with_patches_samples_the_mask_at_patch_frequencies():
    loss = torch.rand(2, 4, 3, 8, 8)
    keep = low_pass_mask(16, 16, 4).expand(2, 16, 16)
    patch_keep = keep[:, 0::2, 0::2]  # patch frequency (u, v) is full frequency (2u, 2v); centre 4 -> 8
    assert patch_keep[0, 4, 4] == keep[0, 8, 8] == 1
    removed = 1 - patch_keep
    expected = (loss * removed[:, None, None]).sum() / removed.sum() / 3 / 4
    torch.testing.assert_close(masked_frequency_loss(loss, keep), expected)
    with pytest.raises(ValueError, match="does not fit"):
        masked_frequency_loss(loss, torch.ones(2, 12, 12))
