"""Token-level comparison of HF and MAX log-probabilities, as pure functions over arrays.

No server, no torch, no tokenizer: the caller hands in numbers and this module
decides MATCH or DIVERGED. ``compare_layers.py`` feeds it real runs; the unit
tests feed it hand-made arrays.

Position indexing. A sequence holds the prompt tokens followed by the tokens
MAX generated greedily. Position ``p`` is the ``p``-th token (0-based). Position
0 has no log-probability (nothing precedes it), so the scored positions are
``1 .. len-1``; the score at ``p`` is log P(token[p] | token[0..p-1]). Positions
below ``prompt_length`` are prompt positions, the rest are greedy positions.

What is compared at every scored position:

* the log-probability each side gives the actual token there (``abs_diff``);
* the log-probability of every token MAX lists in its top-k whose id is known
  (MAX keys its top-k by decoded text; ids that decode alike are ambiguous and
  skipped), against HF's log-probability of the same id;
* top-1 agreement: HF's top-1 must be MAX's best known top-k entry. MAX keeps
  one value per text key (the last id decoded to it), so its ranking cannot
  be trusted where ids collide: when HF's top-1 may hide under a shared key
  the check is skipped. A disagreement counts only when it is not a tie: HF
  gives MAX's best known id a logprob within twice the tolerance of its own
  top-1 (each side may be off by the tolerance).

At greedy positions the token is MAX's choice, and HF scores MAX's own
sequence (one forward pass over the prompt and MAX's tokens), so every
position is compared on the same prefix. Where MAX's greedy token differs from
HF's argmax, the tie rule (``greedy_tie``) replaces the top-1 check. It works
with what MAX returns (at most 7 top entries, keyed by decoded text) and stays
strict: MAX's logprob of its token must equal HF's logprob of that token
within the tolerance, that token must be within the tolerance of HF's
maximum, and where HF's argmax is among MAX's entries their logprobs must
agree too. With a final logit soft-cap dozens of tokens can score exactly the
cap, so neither side's top-k need hold the other side's choice; the rule does
not ask for that. An accepted tie is counted (``PositionResult.tie``) and the
comparison goes on; a refused one is the divergence and the comparison stops.
Any logprob outside the tolerance is DIVERGED whatever the ties.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

MATCH = "MATCH"
DIVERGED = "DIVERGED"


@dataclass(frozen=True)
class MaxTopEntry:
    """One entry of MAX's top-k at a position: the decoded text, its id when unambiguous, the logprob."""

    text: str
    token_id: int | None
    logprob: float


@dataclass
class PositionResult:
    """The comparison at one scored position."""

    position: int
    phase: str  # "prompt" or "greedy"
    token_id: int
    hf_logprob: float
    max_logprob: float
    abs_diff: float  # largest |Δ| at this position (actual token and known top-k ids)
    hf_top1: int
    max_top1: int | None  # MAX's best top-k entry whose id is known (None when no id is)
    top1_agree: bool | None  # None when HF's top-1 may hide under a text key several ids share
    topk_overlap: int  # ids in both top-k lists (known ids only)
    ok: bool
    reason: str  # "" when ok; else "logprob", "top1" or "greedy"
    tie: bool = False  # accepted only as a tie: the two sides' top-1 (or greedy token) differ


@dataclass
class SequenceComparison:
    """The comparison of one prompt (and MAX's greedy continuation of it)."""

    prompt_length: int
    positions: list[PositionResult] = field(default_factory=list)
    greedy_compared: int = 0  # greedy tokens compared before the comparison stopped
    greedy_tie_at: int | None = None  # position of the first accepted greedy tie, if any

    @property
    def ties(self) -> list[int]:
        """Positions accepted only as ties (top-1 or greedy token differs, logprobs within tolerance)."""
        return [p.position for p in self.positions if p.tie]

    @property
    def first_divergence(self) -> PositionResult | None:
        return next((p for p in self.positions if not p.ok), None)

    @property
    def verdict(self) -> str:
        return MATCH if self.first_divergence is None else DIVERGED

    @property
    def max_abs_diff(self) -> float:
        return max((p.abs_diff for p in self.positions), default=0.0)

    def to_dict(self) -> dict:
        first = self.first_divergence
        return {
            "verdict": self.verdict,
            "prompt_length": self.prompt_length,
            "max_abs_diff": self.max_abs_diff,
            "first_divergence": asdict(first) if first else None,
            "greedy_compared": self.greedy_compared,
            "greedy_tie_at": self.greedy_tie_at,
            "ties": self.ties,
            "tie_count": len(self.ties),
            "positions": [asdict(p) for p in self.positions],
        }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def text_index(decoded: Sequence[str]) -> dict[str, list[int]]:
    """Map each decoded token text to the ids that decode to it (``decoded[id]`` is the text)."""
    index: dict[str, list[int]] = {}
    for token_id, text in enumerate(decoded):
        index.setdefault(text, []).append(token_id)
    return index


def resolve_top(top: dict[str, float], index: dict[str, list[int]]) -> list[MaxTopEntry]:
    """Turn MAX's text-keyed top-k into entries, best first, with ids where the text is unambiguous."""
    entries = []
    for text, logprob in top.items():
        ids = index.get(text, [])
        entries.append(MaxTopEntry(text, ids[0] if len(ids) == 1 else None, float(logprob)))
    entries.sort(key=lambda e: e.logprob, reverse=True)
    return entries


def compare_sequence(
    token_ids: Sequence[int],
    prompt_length: int,
    hf_logprobs: np.ndarray,
    max_logprobs: Sequence[float],
    max_top: Sequence[Sequence[MaxTopEntry]],
    atol: float,
    top_k: int,
    decoded: Sequence[str] | None = None,
) -> SequenceComparison:
    """Compare HF and MAX at every scored position of one sequence.

    ``token_ids``: prompt ids then MAX's greedy ids (length T).
    ``hf_logprobs``: HF log-softmax rows, shape (T-1, vocab); row ``p-1`` is the
    distribution for position ``p``.
    ``max_logprobs``: MAX's logprob of the actual token at positions 1..T-1.
    ``max_top``: MAX's top-k entries at positions 1..T-1 (best first).
    ``atol``: absolute logprob tolerance; ``top_k``: k used for the top-k checks.
    ``decoded``: the text of each id as MAX decodes it (narrows which shared
    text keys may hide a token); optional.
    """
    tokens = [int(t) for t in token_ids]
    total = len(tokens)
    hf = np.asarray(hf_logprobs, dtype=np.float64)
    if prompt_length < 1 or prompt_length > total:
        raise ValueError(f"prompt_length {prompt_length} is outside 1..{total}")
    if hf.ndim != 2 or hf.shape[0] != total - 1:
        raise ValueError(f"hf_logprobs must have shape ({total - 1}, vocab), got {hf.shape}")
    if len(max_logprobs) != total - 1 or len(max_top) != total - 1:
        raise ValueError(
            f"MAX gave {len(max_logprobs)} logprobs and {len(max_top)} top-k lists for {total - 1} scored positions"
        )
    result = SequenceComparison(prompt_length=prompt_length)
    for position in range(1, total):
        row = hf[position - 1]
        token = tokens[position]
        top = list(max_top[position - 1])
        phase = "prompt" if position < prompt_length else "greedy"
        hf_order = np.argsort(-row, kind="stable")[:top_k]
        scored = _score_position(position, phase, token, row, hf_order, top, float(max_logprobs[position - 1]), atol,
                                 decoded)
        split = phase == "greedy" and int(hf_order[0]) != token
        if split and scored.reason in ("", "top1"):
            tie = greedy_tie(token, row, top, float(max_logprobs[position - 1]), atol)
            scored.reason = "" if tie else "greedy"
            scored.ok = scored.tie = tie
            if tie and result.greedy_tie_at is None:
                result.greedy_tie_at = position
        result.positions.append(scored)
        if phase == "greedy":
            result.greedy_compared += 1
        if split and not scored.ok:
            break  # past a refused split HF's next tokens are not a greedy continuation of this prefix
    return result


def greedy_tie(token: int, row: np.ndarray, top: Sequence[MaxTopEntry], max_logprob: float, atol: float) -> bool:
    """Whether MAX's greedy ``token`` is an exact-within-tolerance tie with HF's argmax.

    Accepted only when (1) MAX's logprob of ``token`` equals HF's within ``atol``,
    (2) HF gives ``token`` a logprob within ``atol`` of its maximum, and (3) if
    HF's argmax is among MAX's entries with a known id, their logprobs agree
    within ``atol``. Neither side's top-k has to hold the other's choice.
    """
    hf_best = int(np.argmax(row))
    if abs(float(row[token]) - max_logprob) > atol:
        return False
    if float(row[token]) < float(row[hf_best]) - atol:
        return False
    listed = [e for e in top if e.token_id == hf_best]
    return all(abs(e.logprob - float(row[hf_best])) <= atol for e in listed)


def _score_position(
    position: int,
    phase: str,
    token: int,
    row: np.ndarray,
    hf_order: np.ndarray,
    top: list[MaxTopEntry],
    max_logprob: float,
    atol: float,
    decoded: Sequence[str] | None,
) -> PositionResult:
    hf_logprob = float(row[token])
    known = [e for e in top if e.token_id is not None]
    diffs = [abs(hf_logprob - max_logprob)] + [abs(float(row[e.token_id]) - e.logprob) for e in known]
    abs_diff = max(diffs)
    hf_top1 = int(hf_order[0])
    best_known = max(known, key=lambda e: e.logprob) if known else None
    max_top1 = best_known.token_id if best_known else None
    where = _where_in_max_top(hf_top1, top, decoded)
    if where == "ambiguous":
        top1_agree = None  # HF's top-1 may hide under a text key several ids share
    elif where == "absent":
        top1_agree = False
    else:
        top1_agree = max_top1 == hf_top1
    # Each side may be off by atol, so a gap up to 2*atol between the two top-1 tokens is a tie.
    tie = max_top1 is not None and float(row[max_top1]) >= float(row[hf_top1]) - 2 * atol
    reason = ""
    if abs_diff > atol:
        reason = "logprob"
    elif top1_agree is False and not tie:
        reason = "top1"
    accepted_tie = not reason and top1_agree is False
    return PositionResult(
        position=position,
        phase=phase,
        token_id=token,
        hf_logprob=hf_logprob,
        max_logprob=max_logprob,
        abs_diff=abs_diff,
        hf_top1=hf_top1,
        max_top1=max_top1,
        top1_agree=top1_agree,
        topk_overlap=len({e.token_id for e in known} & {int(i) for i in hf_order}),
        ok=not reason,
        reason=reason,
        tie=accepted_tie,
    )


def _where_in_max_top(token: int, top: list[MaxTopEntry], decoded: Sequence[str] | None) -> str:
    """Whether ``token`` is in MAX's top-k: "known" (its id is there), "ambiguous" or "absent".

    "ambiguous": a text key that several ids share may hold it (with ``decoded``,
    only a key equal to the token's own text counts; without, any shared key).
    """
    if any(e.token_id == token for e in top):
        return "known"
    shared = [e for e in top if e.token_id is None]
    if decoded is not None:
        shared = [e for e in shared if e.text == decoded[token]]
    return "ambiguous" if shared else "absent"


def tie_count(comparisons: Sequence[SequenceComparison]) -> int:
    """Positions accepted only as ties, over all sequences."""
    return sum(len(c.ties) for c in comparisons)


def summarize(comparisons: Sequence[SequenceComparison]) -> tuple[str, int | None, float]:
    """Overall verdict, index of the first diverged sequence, and max |Δ| over all sequences."""
    first = next((i for i, c in enumerate(comparisons) if c.verdict == DIVERGED), None)
    verdict = MATCH if first is None else DIVERGED
    return verdict, first, max((c.max_abs_diff for c in comparisons), default=0.0)
