"""The forward process of CPT and SFT (SPEC section 3): mask (M2T), noise (T2T), keep.

Legend:
    B, L      batch size, sequence length; V vocabulary size
    x0        clean tokens (B, L); the label of every supervised position is x0
    xt        corrupted tokens (B, L) fed to the model (the noisy half of [xt ; x0])
    t         mask ratio of an example, t ~ U[t_min, t_max]
    r         noise ratio of an example, r ~ U[0, noise_max]
    mask_id   the diffusion mask token
    maskable  bool (B, L): positions the forward process may touch (SFT: response + EOS
              padding; CPT: every real token). Everything else is never changed nor supervised.
    block b, block_length: play no part here. Every block of an example is corrupted at the same
              t; the block structure enters only through the attention mask (`masks.py`).

Per example (`corrupt`):
    1. t ~ U[t_min, t_max]; every maskable token is masked independently with probability t.
    2. r ~ U[0, noise_max]; every still-visible maskable token is replaced independently with
       probability r by a token drawn uniformly from the vocabulary minus the special ids
       (mask_id is always excluded) and minus the original token, so a substitute always differs
       from x0 and is never a special id.
    3. Every remaining unchanged visible maskable token is marked "kept" (supervised to stay as
       it is) independently with probability keep_share.
So E[masked share] = E[t], E[noised share] = E[r] (1 - E[t]), E[kept share] =
keep_share (1 - E[t]) (1 - E[r]), t and r being independent.

Determinism contract: all randomness of one example comes from CPU `torch.Generator`s seeded
from that example's seed (`example_seed(seed, step, rank, index)`), with a fixed number of
draws per example. The result of an example therefore depends only on its seed, its tokens and
its length, never on its batch mates, its position in the batch, the device, or how many steps
ran before in this process: a resumed run sees exactly the noise an uninterrupted run would have
seen. Each stage has its own stream derived from the example seed (`corrupt`: the seed itself;
`complementary`: stream "complement"; `apply_model_draft`: stream "draft"), so enabling one
option never shifts the draws of another. Draws are made on the CPU and moved to x0's device.

Functions take tensors and return tensors (no config objects, no torch.distributed).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import struct
from collections.abc import Sequence

import torch

_MASK63 = (1 << 63) - 1


def example_seed(seed: int, step: int, rank: int, index: int) -> int:
    """Deterministic 63-bit seed of one example: blake2b of the four ints (signed 64-bit).

    `index` is the example's position among everything this rank corrupts in this optimizer
    step (micro-batch offset included), so no two examples of a run share a seed. Unlike
    Python's `hash`, the value is the same in every process and on every platform.
    """
    digest = hashlib.blake2b(struct.pack("<4q", seed, step, rank, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def _stream_seed(seed: int, stream: str) -> int:
    """Seed of a named sub-stream of an example seed (independent of the main stream)."""
    payload = struct.pack("<q", seed) + stream.encode()
    digest = hashlib.blake2b(payload, digest_size=8, person=b"llada-stream").digest()
    return int.from_bytes(digest, "little") & _MASK63


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


@dataclasses.dataclass
class Corruption:
    """One corrupted batch. Parts are disjoint; every supervised position has label x0.

    is_masked: xt == mask_id (M2T). is_noised: xt is a substitute != x0 (T2T).
    is_kept: xt == x0 and supervised to stay (keep). t: the example's mask ratio, used by the
    1/t loss weighting.
    """

    xt: torch.Tensor  # (B, L) long
    is_masked: torch.Tensor  # (B, L) bool
    is_noised: torch.Tensor  # (B, L) bool
    is_kept: torch.Tensor  # (B, L) bool
    t: torch.Tensor  # (B,) float32

    @property
    def supervised(self) -> torch.Tensor:
        return self.is_masked | self.is_noised | self.is_kept  # (B, L) bool

    @staticmethod
    def cat(parts: Sequence[Corruption]) -> Corruption:
        """Concatenate along the batch dimension."""
        return Corruption(
            *(
                torch.cat([getattr(p, f.name) for p in parts])
                for f in dataclasses.fields(Corruption)
            )
        )


@functools.lru_cache(maxsize=8)
def _substitute_tables(
    vocab_size: int, excluded: tuple[int, ...], device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(is_allowed (V,) bool, allowed_ids (A,) long, rank_of (V,) long: index in allowed_ids)."""
    is_allowed = torch.ones(vocab_size, dtype=torch.bool)  # (V,)
    is_allowed[list(excluded)] = False
    allowed_ids = is_allowed.nonzero().squeeze(1)  # (A,)
    rank_of = torch.cumsum(is_allowed.long(), 0) - 1  # (V,); meaningful where allowed
    return is_allowed.to(device), allowed_ids.to(device), rank_of.to(device)


def _check_vocab(vocab_size: int, special_ids: Sequence[int], mask_id: int) -> tuple[int, ...]:
    excluded = tuple(sorted({int(i) for i in special_ids} | {int(mask_id)}))
    if any(i < 0 or i >= vocab_size for i in excluded):
        raise ValueError(f"special ids {excluded} must lie in [0, vocab_size={vocab_size})")
    if vocab_size - len(excluded) < 2:
        raise ValueError("T2T noise needs at least 2 non-special tokens in the vocabulary")
    return excluded


def _check_seeds(x0: torch.Tensor, maskable: torch.Tensor, seeds: Sequence[int]) -> None:
    if x0.dim() != 2 or maskable.shape != x0.shape or maskable.dtype != torch.bool:
        raise ValueError("x0 must be (B, L) and maskable a bool tensor of the same shape")
    if len(seeds) != x0.shape[0]:
        raise ValueError(f"need one seed per example: got {len(seeds)} for batch {x0.shape[0]}")


def _draw(seeds: Sequence[int], seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The fixed set of uniforms of each example, from one generator per example seed."""
    rows = [
        torch.rand(2 + 4 * seq_len, generator=_generator(s), dtype=torch.float64) for s in seeds
    ]
    u = torch.stack(rows).to(device)  # (B, 2 + 4L) float64
    chunks = u[:, 2:].view(len(seeds), 4, seq_len)  # (B, 4, L)
    return {
        "t": u[:, 0],  # (B,)
        "r": u[:, 1],  # (B,)
        "mask": chunks[:, 0],  # (B, L)
        "noise": chunks[:, 1],  # (B, L)
        "substitute": chunks[:, 2],  # (B, L)
        "keep": chunks[:, 3],  # (B, L)
    }


def _noise_and_keep(
    x0: torch.Tensor,
    maskable: torch.Tensor,
    is_masked: torch.Tensor,
    t: torch.Tensor,
    draws: dict[str, torch.Tensor],
    mask_id: int,
    noise_max: float,
    keep_share: float,
    vocab_size: int,
    excluded: tuple[int, ...],
) -> Corruption:
    """Steps 2-3 of the module docstring, given the masked positions (step 1)."""
    is_allowed, allowed_ids, rank_of = _substitute_tables(vocab_size, excluded, str(x0.device))
    r = noise_max * draws["r"]  # (B,)
    visible = maskable & ~is_masked
    is_noised = visible & (draws["noise"] < r[:, None])  # (B, L)
    # Uniform over allowed ids minus x0: draw k in [0, n) with n = A - [x0 allowed], then skip
    # over x0's own slot. Float64 uniforms keep the bins even for a 157k vocabulary.
    orig_allowed = is_allowed[x0]  # (B, L)
    n = allowed_ids.numel() - orig_allowed.long()  # (B, L)
    k = torch.minimum((draws["substitute"] * n).long(), n - 1)  # (B, L)
    k = k + (orig_allowed & (k >= rank_of[x0])).long()
    substitute = allowed_ids[k]  # (B, L)
    is_kept = visible & ~is_noised & (draws["keep"] < keep_share)  # (B, L)
    xt = torch.where(is_masked, mask_id, torch.where(is_noised, substitute, x0))  # (B, L)
    return Corruption(xt, is_masked, is_noised, is_kept, t.float())


def corrupt(
    x0: torch.Tensor,
    maskable: torch.Tensor,
    seeds: Sequence[int],
    *,
    mask_id: int,
    t_min: float,
    t_max: float,
    noise_max: float,
    keep_share: float,
    vocab_size: int,
    special_ids: Sequence[int],
) -> Corruption:
    """Mask, noise and keep each example of x0 (B, L) from its own seed (module docstring).

    special_ids: ids a substitute may never be (mask, EOS/pad, role markers); mask_id is
    excluded even if absent from the list. Maskable positions may hold special ids (EOS padding):
    they are masked or noised like any other token, with label x0.
    """
    _check_seeds(x0, maskable, seeds)
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if not 0.0 <= noise_max <= 1.0 or not 0.0 <= keep_share <= 1.0:
        raise ValueError(f"noise_max={noise_max} and keep_share={keep_share} must lie in [0, 1]")
    excluded = _check_vocab(vocab_size, special_ids, mask_id)
    draws = _draw(seeds, x0.shape[1], x0.device)
    t = t_min + (t_max - t_min) * draws["t"]  # (B,) float64
    is_masked = maskable & (draws["mask"] < t[:, None])  # (B, L)
    return _noise_and_keep(
        x0, maskable, is_masked, t, draws, mask_id, noise_max, keep_share, vocab_size, excluded
    )


def complementary(
    x0: torch.Tensor,
    maskable: torch.Tensor,
    c: Corruption,
    seeds: Sequence[int],
    *,
    mask_id: int,
    noise_max: float,
    keep_share: float,
    vocab_size: int,
    special_ids: Sequence[int],
) -> Corruption:
    """The LLaDA2.0 complementary partner of `c` (same x0, maskable and seeds as `corrupt`).

    The partner masks exactly the maskable positions `c` left unmasked (visible, noised or
    kept in `c`), so across the pair every maskable token is masked exactly once. Its t is
    1 - t (the expected masked share, used by the 1/t weighting). Noise and keep are then drawn
    afresh among the partner's visible maskable positions (= the ones `c` masked), with
    r ~ U[0, noise_max] and keep_share as in `corrupt`, from the example's "complement" stream,
    so they are independent of the noise and keep of `c`.
    """
    _check_seeds(x0, maskable, seeds)
    excluded = _check_vocab(vocab_size, special_ids, mask_id)
    draws = _draw([_stream_seed(s, "complement") for s in seeds], x0.shape[1], x0.device)
    is_masked = maskable & ~c.is_masked  # (B, L)
    t = 1.0 - c.t.double()  # (B,)
    return _noise_and_keep(
        x0, maskable, is_masked, t, draws, mask_id, noise_max, keep_share, vocab_size, excluded
    )


def with_complements(
    x0: torch.Tensor,
    maskable: torch.Tensor,
    seeds: Sequence[int],
    *,
    mask_id: int,
    t_min: float,
    t_max: float,
    noise_max: float,
    keep_share: float,
    vocab_size: int,
    special_ids: Sequence[int],
) -> Corruption:
    """Batch of 2B: rows [0, B) are `corrupt(x0, ...)`, rows [B, 2B) their partners.

    Originals then partners (not interleaved), so the first half is exactly what `corrupt`
    returns and every other per-example tensor of the batch doubles as `torch.cat([v, v])`
    (x0 for the loss, doc ids, position ids). The micro-batch costs twice the tokens.
    """
    vocab = dict(mask_id=mask_id, vocab_size=vocab_size, special_ids=special_ids)
    c = corrupt(
        x0, maskable, seeds, t_min=t_min, t_max=t_max, noise_max=noise_max,
        keep_share=keep_share, **vocab,
    )  # fmt: skip
    partner = complementary(
        x0, maskable, c, seeds, noise_max=noise_max, keep_share=keep_share, **vocab
    )
    return Corruption.cat([c, partner])


def apply_model_draft(
    c: Corruption,
    x0: torch.Tensor,
    draft_logits: torch.Tensor,
    fraction: float,
    seeds: Sequence[int],
    *,
    mask_id: int,
    special_ids: Sequence[int],
) -> Corruption:
    """Multi-turn forward (MTF): write the model's own draft into some masked positions.

    draft_logits (B, L, V): logits of a no-grad forward on c.xt (the caller runs it). Each masked
    position is drafted independently with probability `fraction` (the example's "draft"
    stream). Its token becomes the argmax of its logits with mask_id and special_ids suppressed
    (so, like the uniform noise, a draft never writes a special token); it is then noised (T2T)
    where the draft differs from x0 and kept (visible, correct, supervised) where it equals x0.
    Undrafted positions and t are unchanged: t stays the ratio the masks were drawn with.
    """
    _check_seeds(x0, c.is_masked, seeds)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"MTF draft fraction must lie in [0, 1], got {fraction}")
    if draft_logits.shape[:2] != x0.shape:
        raise ValueError(f"draft_logits {tuple(draft_logits.shape)} must be (B, L, V)")
    rows = [torch.rand(x0.shape[1], generator=_generator(_stream_seed(s, "draft"))) for s in seeds]
    u = torch.stack(rows).to(x0.device)  # (B, L)
    is_drafted = c.is_masked & (u < fraction)  # (B, L)
    idx = is_drafted.nonzero(as_tuple=True)
    logits = draft_logits[idx].detach().float()  # (N, V): only the drafted positions
    excluded = sorted({int(i) for i in special_ids} | {int(mask_id)})
    logits[:, excluded] = float("-inf")
    draft = torch.zeros_like(x0)  # (B, L)
    draft[idx] = logits.argmax(-1)
    is_right = draft == x0
    xt = torch.where(is_drafted, draft, c.xt)  # (B, L)
    return Corruption(
        xt=xt,
        is_masked=c.is_masked & ~is_drafted,
        is_noised=c.is_noised | (is_drafted & ~is_right),
        is_kept=c.is_kept | (is_drafted & is_right),
        t=c.t,
    )
