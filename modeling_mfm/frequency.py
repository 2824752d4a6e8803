"""Frequency-domain masking and the frequency loss of Masked Frequency Modeling.

Pure torch (no transformers import) so that it can be used on its own and shipped as Hub remote code.
Conventions follow the official implementation (Xie et al., ICLR 2023):

* spectra are ``fftshift``-ed, so the zero frequency sits at ``(H // 2, W // 2)``;
* a *keep* mask holds 1 for frequencies that are kept and 0 for frequencies that are removed;
* every FFT runs in float32 with autocast disabled: half-precision FFTs lose precision and cuFFT only
  supports power-of-two sizes in fp16.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "FrequencyLoss",
    "filter_frequencies",
    "high_pass_mask",
    "low_pass_mask",
    "masked_frequency_loss",
    "sample_frequency_masks",
]


def _autocast_off(tensor: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def low_pass_mask(
    height: int,
    width: int,
    radius: float,
    outer_radius: float | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Keep-mask (H, W) of a low-pass filter in fftshifted layout.

    With ``d²`` the squared distance to the centre ``(H // 2, W // 2)``, the mask is 0 where
    ``radius² <= d² < outer_radius²`` and 1 elsewhere (``outer_radius=None`` means no outer bound).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    if outer_radius is not None and outer_radius <= radius:
        raise ValueError(f"outer_radius must be > radius ({radius}), got {outer_radius}")
    ys = torch.arange(height, device=device) - height // 2
    xs = torch.arange(width, device=device) - width // 2
    dist2 = ys[:, None] ** 2 + xs[None, :] ** 2  # (H, W), integer
    removed = dist2 >= radius**2
    if outer_radius is not None:
        removed &= dist2 < outer_radius**2
    return (~removed).to(dtype)


def high_pass_mask(
    height: int,
    width: int,
    radius: float,
    outer_radius: float | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Keep-mask (H, W) of the high-pass filter: ``1 - low_pass_mask(...)``."""
    return 1 - low_pass_mask(height, width, radius, outer_radius, device=device, dtype=dtype)


def sample_frequency_masks(
    batch_size: int,
    low_pass: torch.Tensor,
    low_pass_keep: torch.Tensor,
) -> torch.Tensor:
    """Per-image keep-masks (B, H, W): the low-pass mask where ``low_pass`` is true, the high-pass one elsewhere.

    ``low_pass`` is a (B,) boolean tensor (e.g. ``torch.rand(B) < p``), drawn by the caller on its device.
    """
    if low_pass.shape != (batch_size,):
        raise ValueError(f"low_pass must have shape ({batch_size},), got {tuple(low_pass.shape)}")
    low = low_pass.to(low_pass_keep.dtype)[:, None, None]
    return low * low_pass_keep + (1 - low) * (1 - low_pass_keep)


def _keep_as_4d(keep: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Brings a keep-mask given as (H, W), (B, H, W) or (B, 1, H, W) to (B or 1, 1, H, W)."""
    height, width = images.shape[-2:]
    if keep.dim() == 2:
        keep = keep[None, None]
    elif keep.dim() == 3:
        keep = keep[:, None]
    elif keep.dim() != 4 or keep.shape[1] != 1:
        raise ValueError(f"keep must be (H, W), (B, H, W) or (B, 1, H, W), got {tuple(keep.shape)}")
    if keep.shape[-2:] != (height, width):
        raise ValueError(f"keep mask is {tuple(keep.shape[-2:])} but images are {height}x{width}")
    if keep.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"keep mask batch {keep.shape[0]} does not match images batch {images.shape[0]}")
    return keep


def filter_frequencies(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Removes frequencies from images in [0, 1]: ``ifft2(ifftshift(fftshift(fft2(x)) * keep)).real.clamp(0, 1)``.

    Args:
        images: (B, C, H, W) in [0, 1] (unnormalised).
        keep: keep-mask in centred layout, (H, W), (B, H, W) or (B, 1, H, W); 1 = kept, 0 = removed.

    Returns:
        The filtered images, (B, C, H, W), in the input dtype (computed in float32).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    keep = _keep_as_4d(keep, images)
    height, width = images.shape[-2:]
    with _autocast_off(images):
        # shifting the (B, 1, H, W) real mask to the FFT's layout moves 6-12x fewer bytes than shifting the complex
        # (B, C, H, W) spectrum there and back; the products are the same numbers
        keep = torch.fft.ifftshift(keep.float(), dim=(-2, -1))
        # a real image has a Hermitian spectrum F(-k) = conj(F(k)), so Re ifft2(F * keep) = ifft2(F * sym(keep)) with
        # sym(keep)(k) = (keep(k) + keep(-k)) / 2: the real-input FFTs (half the spectrum, no real-to-complex copy)
        # give the same image for any mask (the MFM masks are symmetric already)
        keep = 0.5 * (keep + _negated_frequencies(keep))[..., : width // 2 + 1]
        # the product on the real and imaginary parts as a real tensor, which torch.compile can fuse
        spectrum = torch.view_as_real(torch.fft.rfft2(images.float()))
        filtered = torch.fft.irfft2(torch.view_as_complex(spectrum * keep[..., None]), s=(height, width))
        return filtered.clamp(0.0, 1.0).to(images.dtype)


def _negated_frequencies(values: torch.Tensor) -> torch.Tensor:
    """``values[..., -ky mod H, -kx mod W]`` for a tensor over the two last (FFT-layout frequency) dimensions."""
    return torch.roll(values.flip(-2, -1), shifts=(1, 1), dims=(-2, -1))


def _full_power_spectrum(half: torch.Tensor, width: int) -> torch.Tensor:
    """``|F|²`` over all ``width`` columns from the ``width // 2 + 1`` columns of a real input's ``rfft2``.

    The missing columns ``kx > width // 2`` hold ``|F(-ky, width - kx)|²`` (a Hermitian spectrum's magnitudes are
    symmetric under k -> -k), so they are the columns ``1 .. width - width // 2 - 1`` mirrored in both directions.
    """
    mirrored = half[..., 1 : width - width // 2].flip(-1)
    mirrored = torch.roll(mirrored.flip(-2), shifts=1, dims=-2)
    return torch.cat([half, mirrored], dim=-1)


class FrequencyLoss(nn.Module):
    """Distance between the spectra of two images, per frequency (after Focal Frequency Loss, Jiang et al. 2021).

    Args:
        loss_gamma: exponent of the per-frequency Euclidean distance.
        matrix_gamma: exponent of the spectrum weight matrix (with ``with_matrix``).
        patch_factor: the images are cut into ``patch_factor²`` patches whose spectra are compared separately.
        ave_spectrum: compare the batch-mean spectra instead of per-image spectra.
        with_matrix: weight each frequency by its (detached, normalised) current distance.
        log_matrix: use ``log(1 + w)`` for the weight matrix.
        batch_matrix: normalise the weight matrix by its maximum over the whole batch instead of per image and channel.

    ``forward(pred, target, matrix=None)`` returns the unreduced float32 loss of shape (B, P, C, H/pf, W/pf)
    (B is 1 with ``ave_spectrum``). Autocast is disabled inside.
    """

    def __init__(
        self,
        loss_gamma: float = 1.0,
        matrix_gamma: float = 1.0,
        patch_factor: int = 1,
        ave_spectrum: bool = False,
        with_matrix: bool = False,
        log_matrix: bool = False,
        batch_matrix: bool = False,
    ) -> None:
        super().__init__()
        if patch_factor < 1:
            raise ValueError(f"patch_factor must be >= 1, got {patch_factor}")
        self.loss_gamma = loss_gamma
        self.matrix_gamma = matrix_gamma
        self.patch_factor = patch_factor
        self.ave_spectrum = ave_spectrum
        self.with_matrix = with_matrix
        self.log_matrix = log_matrix
        self.batch_matrix = batch_matrix

    def extra_repr(self) -> str:
        return (
            f"loss_gamma={self.loss_gamma}, matrix_gamma={self.matrix_gamma}, patch_factor={self.patch_factor}, "
            f"ave_spectrum={self.ave_spectrum}, with_matrix={self.with_matrix}, log_matrix={self.log_matrix}, "
            f"batch_matrix={self.batch_matrix}"
        )

    def to_spectrum(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> centred orthonormal spectra of the patches, complex (B, P, C, H/pf, W/pf)."""
        return torch.fft.fftshift(torch.fft.fft2(self._patches(images), norm="ortho"), dim=(-2, -1))

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> float32 patches (B, P, C, H/pf, W/pf) in row-major patch order, as the official loop."""
        batch, channels, height, width = images.shape
        pf = self.patch_factor
        if height % pf or width % pf:
            raise ValueError(f"patch_factor {pf} must divide the image size {height}x{width}")
        ph, pw = height // pf, width // pf
        # (B, C, pf, ph, pf, pw) -> (B, pf, pf, C, ph, pw): patches in row-major order, as the official loop
        patches = images.float().reshape(batch, channels, pf, ph, pf, pw).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(batch, pf * pf, channels, ph, pw)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        if pred.shape != target.shape or pred.dim() != 4:
            raise ValueError(
                f"pred and target must both be (B, C, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        with _autocast_off(pred):
            # the FFT is linear: the difference of the spectra is the spectrum of the difference, one FFT instead of
            # two (and the batch-mean spectrum that of the batch-mean difference), without subtracting two large
            # spectra to get a small one
            residual = pred.float() - target.float()
            if self.ave_spectrum:
                residual = residual.mean(0, keepdim=True)
            # the real-input FFT (half the spectrum, no real-to-complex copy); real and imaginary parts as a real
            # tensor: element-wise work that torch.compile can fuse (it generates no code for complex operators);
            # the other half of |F|² by symmetry, then the centred layout, one shift of a real tensor
            patches = self._patches(residual)
            diff = torch.view_as_real(torch.fft.rfft2(patches, norm="ortho"))
            dist2 = _full_power_spectrum(diff.square().sum(-1), patches.shape[-1])
            dist2 = torch.fft.fftshift(dist2, dim=(-2, -1))
            loss = torch.sqrt(dist2 + 1e-12) ** self.loss_gamma
            if self.with_matrix:
                loss = self._weight_matrix(dist2, matrix) * loss
        return loss

    def _weight_matrix(self, dist2: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
        if matrix is not None:
            weight = matrix.detach().float()
        else:
            weight = torch.sqrt(dist2.detach()) ** self.matrix_gamma
            if self.log_matrix:
                weight = torch.log(weight + 1.0)
            if self.batch_matrix:
                weight = weight / weight.max()
            else:
                weight = weight / weight.amax(dim=(-2, -1), keepdim=True)
            weight = torch.nan_to_num(weight, nan=0.0).clamp(0.0, 1.0)
        return weight


def masked_frequency_loss(loss: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The official "masked" reduction: mean of ``loss`` over the removed frequencies only (0 when none is removed).

    ``sum(loss * (1 - keep)) / sum(1 - keep) / C / P`` with ``loss`` (B, P, C, H, W) and ``keep`` (B, H, W) or
    (B, 1, H, W); both sums run over the whole batch. With ``patch_factor > 1`` (which the official code does not
    support) each patch spectrum has ``pf`` times coarser frequency steps, so the mask is sampled at those
    frequencies (every ``pf``-th entry, centre on centre) and applied to every patch.
    """
    if loss.dim() != 5:
        raise ValueError(f"loss must be (B, P, C, H, W), got {tuple(loss.shape)}")
    if keep.dim() == 4:
        keep = keep[:, 0]
    if keep.dim() != 3:
        raise ValueError(f"keep must be (B, H, W) or (B, 1, H, W), got {tuple(keep.shape)}")
    _, patches, channels, height, width = loss.shape
    if keep.shape[-2:] != (height, width):
        pf = int(round(patches**0.5))
        full_h, full_w = keep.shape[-2:]
        if pf * pf != patches or (full_h, full_w) != (height * pf, width * pf):
            raise ValueError(f"keep mask {tuple(keep.shape)} does not fit a loss of shape {tuple(loss.shape)}")
        top, left = full_h // 2 - (height // 2) * pf, full_w // 2 - (width // 2) * pf
        keep = keep[:, top::pf, left::pf][:, :height, :width]
    removed = 1.0 - keep.float()
    # a mask that removes nothing leaves nothing to score: 0 / tiny = 0 (and zero gradients) instead of 0 / 0 = NaN;
    # any mask that removes a frequency divides by its count, as the official code
    count = removed.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return (loss * removed[:, None, None]).sum() / count / channels / patches
