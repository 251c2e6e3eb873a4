"""Unit tests of the pure HF-vs-MAX comparison core (no server, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

import logprob_compare as lc
import tolerances

ATOL = tolerances.logprob_atol("float32")
K = 5


def make_rows(length: int, vocab: int = 40, seed: int = 0) -> np.ndarray:
    """HF log-softmax rows for a sequence of ``length`` tokens (``length - 1`` scored positions)."""
    rng = np.random.default_rng(seed)
    return lc.log_softmax(rng.normal(0, 3, size=(length - 1, vocab)))


def greedy_tokens(rows: np.ndarray, prompt: list[int], generated: int) -> list[int]:
    """Prompt ids followed by HF's argmax at the generated positions (rows must cover them)."""
    tokens = list(prompt)
    for position in range(len(prompt), len(prompt) + generated):
        tokens.append(int(np.argmax(rows[position - 1])))
    return tokens


def max_side(rows: np.ndarray, tokens: list[int], k: int = K, texts: list[str] | None = None):
    """What a faithful MAX would return: the same logprobs, top-k keyed by text."""
    vocab = rows.shape[1]
    texts = texts or [f"t{i}" for i in range(vocab)]
    index = lc.text_index(texts)
    logprobs, tops = [], []
    for position in range(1, len(tokens)):
        row = rows[position - 1]
        logprobs.append(float(row[tokens[position]]))
        top = {texts[i]: float(row[i]) for i in np.argsort(-row)[:k]}
        top[texts[tokens[position]]] = float(row[tokens[position]])
        tops.append(lc.resolve_top(top, index))
    return logprobs, tops


def test_identical_sides_match_with_zero_diff():
    rows = make_rows(11)
    tokens = greedy_tokens(rows, [5, 9, 1, 30, 2, 7, 8], 4)
    logprobs, tops = max_side(rows, tokens)
    result = lc.compare_sequence(tokens, 7, rows, logprobs, tops, ATOL, K)
    assert result.verdict == lc.MATCH
    assert result.max_abs_diff == pytest.approx(0.0, abs=1e-12)
    assert [p.position for p in result.positions] == list(range(1, 11))
    assert [p.phase for p in result.positions] == ["prompt"] * 6 + ["greedy"] * 4
    assert result.greedy_compared == 4 and result.greedy_tie_at is None
    assert all(p.top1_agree for p in result.positions)
    assert all(p.topk_overlap == K for p in result.positions)


def test_small_noise_under_tolerance_still_matches():
    rows = make_rows(7)
    tokens = greedy_tokens(rows, [1, 2, 3, 4, 5], 2)
    logprobs, tops = max_side(rows, tokens)
    logprobs = [v + 0.4 * ATOL for v in logprobs]
    result = lc.compare_sequence(tokens, 5, rows, logprobs, tops, ATOL, K)
    assert result.verdict == lc.MATCH
    assert result.max_abs_diff == pytest.approx(0.4 * ATOL, rel=1e-6)


def test_logprob_shift_at_one_position_is_the_first_divergence():
    rows = make_rows(9)
    tokens = greedy_tokens(rows, [3, 4, 5, 6, 7, 8], 3)
    logprobs, tops = max_side(rows, tokens)
    logprobs[3] -= 0.05  # position 4
    result = lc.compare_sequence(tokens, 6, rows, logprobs, tops, ATOL, K)
    first = result.first_divergence
    assert result.verdict == lc.DIVERGED
    assert (first.position, first.reason, first.token_id) == (4, "logprob", tokens[4])
    assert first.hf_logprob == pytest.approx(rows[3, tokens[4]])
    assert first.max_logprob == pytest.approx(rows[3, tokens[4]] - 0.05)
    assert result.max_abs_diff == pytest.approx(0.05)


def test_wrong_topk_logprob_for_another_token_is_caught():
    rows = make_rows(6)
    tokens = [0, 1, 2, 3, 4, 5]
    logprobs, tops = max_side(rows, tokens)
    entries = tops[1]
    other = next(i for i, e in enumerate(entries) if e.token_id != tokens[2])
    entries[other] = lc.MaxTopEntry(entries[other].text, entries[other].token_id, entries[other].logprob + 0.2)
    result = lc.compare_sequence(tokens, 6, rows, logprobs, tops, ATOL, K)
    assert result.first_divergence.position == 2
    assert result.first_divergence.reason == "logprob"
    assert result.max_abs_diff == pytest.approx(0.2)


def test_ambiguous_texts_are_skipped_not_compared():
    rows = make_rows(5, vocab=10)
    texts = [f"t{i}" for i in range(10)]
    texts[7] = texts[8] = "same"
    index = lc.text_index(texts)
    assert index["same"] == [7, 8]
    entries = lc.resolve_top({"same": -0.1, "t1": -2.0}, index)
    assert entries[0] == lc.MaxTopEntry("same", None, -0.1)
    assert entries[1].token_id == 1
    tokens = [0, 1, 2, 3, 4]
    logprobs, tops = max_side(rows, tokens, texts=texts)
    # A wrong value under an ambiguous key cannot be attributed to an id, so it is not compared.
    tops[0] = [lc.MaxTopEntry("same", None, 99.0)] + [e for e in tops[0] if e.token_id is not None]
    result = lc.compare_sequence(tokens, 5, rows, logprobs, tops, ATOL, K, decoded=texts)
    assert result.verdict == lc.MATCH


def test_hf_top1_hidden_under_a_collapsed_key_is_not_a_top1_finding():
    # MAX keeps one value per text: the shared key shows another id's (lower) value, so the
    # best known entry is not MAX's real top-1 and the top-1 check must be skipped.
    rows = make_rows(3, vocab=10, seed=5)
    row = rows[0]
    order = [int(i) for i in np.argsort(-row)]
    best, runner_up, low = order[0], order[1], order[-1]
    texts = [f"t{i}" for i in range(10)]
    texts[best] = texts[low] = "\ufffd"
    index = lc.text_index(texts)
    tokens = [0, runner_up, 2]
    top = lc.resolve_top({"\ufffd": float(row[low]), texts[runner_up]: float(row[runner_up])}, index)
    logprobs, tops = max_side(rows, tokens, texts=texts)
    result = lc.compare_sequence(tokens, 3, rows, logprobs, [top, tops[1]], ATOL, K, decoded=texts)
    first = result.positions[0]
    assert (first.hf_top1, first.max_top1, first.top1_agree) == (best, runner_up, None)
    assert result.verdict == lc.MATCH


def test_hf_top1_missing_from_max_topk_is_a_top1_finding():
    rows = make_rows(3, vocab=10, seed=6)
    row = rows[0]
    order = [int(i) for i in np.argsort(-row)]
    assert row[order[0]] - row[order[1]] > 2 * ATOL
    texts = [f"t{i}" for i in range(10)]
    texts[order[4]] = texts[order[5]] = "shared"  # a shared key that cannot hold HF's top-1
    index = lc.text_index(texts)
    tokens = [0, order[1], 2]
    top = lc.resolve_top({texts[order[1]]: float(row[order[1]]), "shared": float(row[order[5]])}, index)
    logprobs, tops = max_side(rows, tokens, texts=texts)
    result = lc.compare_sequence(tokens, 3, rows, logprobs, [top, tops[1]], ATOL, K, decoded=texts)
    first = result.positions[0]
    assert first.top1_agree is False and first.reason == "top1"
    # Without the decoded texts the shared key might hold HF's top-1, so nothing is claimed.
    lenient = lc.compare_sequence(tokens, 3, rows, logprobs, [top, tops[1]], ATOL, K)
    assert lenient.positions[0].top1_agree is None and lenient.verdict == lc.MATCH


def test_top1_disagreement_beyond_a_tie_diverges_but_a_near_tie_does_not():
    rows = make_rows(4, vocab=20)
    tokens = [0, 1, 2, 3]
    logprobs, tops = max_side(rows, tokens)
    row = rows[0]
    best, second = (int(i) for i in np.argsort(-row)[:2])
    assert row[best] - row[second] > 2 * ATOL
    # MAX lists HF's runner-up first, with HF's own value: only the top-1 check can catch it.
    swapped = [lc.MaxTopEntry(f"t{second}", second, float(row[second]))]
    result = lc.compare_sequence(tokens, 4, rows, logprobs, [swapped, tops[1], tops[2]], ATOL, K)
    assert result.first_divergence.reason == "top1" and result.first_divergence.position == 1
    assert result.first_divergence.max_top1 == second and result.first_divergence.hf_top1 == best
    near = rows.copy()
    near[0, second] = near[0, best] - 0.5 * ATOL
    logprobs2, tops2 = max_side(near, tokens)
    # MAX ranks the runner-up first by 0.3*ATOL, each value within 0.4*ATOL of HF's: a tie, not a finding.
    nudged = {second: 0.4 * ATOL, best: -0.4 * ATOL}
    tops2[0] = [lc.MaxTopEntry(e.text, e.token_id, e.logprob + nudged.get(e.token_id, 0.0)) for e in tops2[0]]
    result2 = lc.compare_sequence(tokens, 4, near, logprobs2, tops2, ATOL, K)
    assert result2.positions[0].top1_agree is False
    assert result2.verdict == lc.MATCH


def test_greedy_split_on_a_clear_runner_up_is_not_a_tie():
    """The old rule (both picks in the other's top-k) accepted this; a runner-up far below HF's max is a bug."""
    rows = make_rows(8, vocab=30, seed=3)
    prompt = [4, 5, 6, 7, 8]
    position = 5
    row = rows[position - 1]
    order = np.argsort(-row)
    assert row[order[0]] - row[order[1]] > ATOL
    tokens = prompt + [int(order[1]), 1, 2]  # MAX picked HF's runner-up at the first greedy step
    logprobs, tops = max_side(rows, tokens)
    result = lc.compare_sequence(tokens, 5, rows, logprobs, tops, ATOL, K)
    assert result.verdict == lc.DIVERGED
    assert (result.first_divergence.position, result.first_divergence.reason) == (position, "greedy")
    assert result.positions[-1].position == position  # a refused split stops the comparison
    assert result.ties == [] and result.greedy_tie_at is None


def test_greedy_split_on_an_exact_tie_is_accepted_and_the_comparison_goes_on():
    rows = make_rows(8, vocab=30, seed=3)
    prompt = [4, 5, 6, 7, 8]
    position = 5
    best = int(np.argmax(rows[position - 1]))
    other = (best + 1) % 30
    rows[position - 1, other] = rows[position - 1, best]
    rows = lc.log_softmax(rows)
    tokens = greedy_tokens(rows, prompt + [other], 2)  # after the tie MAX follows HF's argmax again
    logprobs, tops = max_side(rows, tokens)
    result = lc.compare_sequence(tokens, 5, rows, logprobs, tops, ATOL, K)
    assert result.verdict == lc.MATCH
    assert result.positions[-1].position == 7 and result.greedy_compared == 3  # compared past the tie
    tie = result.positions[position - 1]
    assert (tie.position, tie.ok, tie.tie, tie.reason) == (position, True, True, "")
    assert result.greedy_tie_at == position and position in result.ties


def test_greedy_split_outside_topk_diverges():
    rows = make_rows(7, vocab=30, seed=4)
    prompt = [4, 5, 6, 7, 8]
    row = rows[4]
    worst = int(np.argmin(row))
    tokens = prompt + [worst, 1]
    logprobs, tops = max_side(rows, tokens)
    # MAX's own top-k would have its pick first; it need not contain HF's top-1.
    tops[4] = [lc.MaxTopEntry(f"t{worst}", worst, float(row[worst]))]
    result = lc.compare_sequence(tokens, 5, rows, logprobs, tops, ATOL, K)
    first = result.first_divergence
    assert result.verdict == lc.DIVERGED
    assert (first.position, first.phase, first.reason) == (5, "greedy", "greedy")
    assert first.hf_top1 == int(np.argmax(row))


def test_bad_shapes_raise():
    rows = make_rows(5)
    tokens = [0, 1, 2, 3, 4]
    logprobs, tops = max_side(rows, tokens)
    with pytest.raises(ValueError, match="shape"):
        lc.compare_sequence(tokens, 5, rows[:-1], logprobs, tops, ATOL, K)
    with pytest.raises(ValueError, match="scored positions"):
        lc.compare_sequence(tokens, 5, rows, logprobs[:-1], tops, ATOL, K)
    with pytest.raises(ValueError, match="prompt_length"):
        lc.compare_sequence(tokens, 0, rows, logprobs, tops, ATOL, K)


def test_summarize_reports_first_diverged_sequence_and_max():
    rows = make_rows(5)
    tokens = [0, 1, 2, 3, 4]
    logprobs, tops = max_side(rows, tokens)
    good = lc.compare_sequence(tokens, 5, rows, logprobs, tops, ATOL, K)
    bad_logprobs = list(logprobs)
    bad_logprobs[2] += 1.5
    bad = lc.compare_sequence(tokens, 5, rows, bad_logprobs, tops, ATOL, K)
    assert lc.summarize([good, bad, good]) == (lc.DIVERGED, 1, pytest.approx(1.5))
    assert lc.summarize([good]) == (lc.MATCH, None, pytest.approx(0.0, abs=1e-12))
    document = bad.to_dict()
    assert document["verdict"] == "DIVERGED" and document["first_divergence"]["position"] == 3


def test_compare_human_output_opens_and_closes_with_the_verdict():
    """Ernie 4.5 dogfood: the verdict and the first divergence sat above long per-position tables. The headline
    (verdict, first divergence, max |Δ|) is now the first and the last line; the JSON document is unchanged."""
    import port_compare

    rows = make_rows(12)
    tokens = list(range(12))
    logprobs, tops = max_side(rows, tokens)
    good = lc.compare_sequence(tokens, 12, rows, logprobs, tops, ATOL, K)
    bad_logprobs = list(logprobs)
    bad_logprobs[4] += 1.5
    bad = lc.compare_sequence(tokens, 12, rows, bad_logprobs, tops, ATOL, K)

    def report(*comparisons):
        runs = [port_compare.PromptRun(f"prompt {i}", tokens, [], c) for i, c in enumerate(comparisons)]
        return port_compare.CompareReport("m", "m", "http://127.0.0.1:1", "port", "float32", ATOL, K, runs)

    diverged = report(good, bad, good)
    lines = port_compare.format_report(diverged).splitlines()
    assert lines[0] == lines[-1] == port_compare.headline(diverged)
    assert lines[0].startswith("verdict: DIVERGED at prompt 1 position 5 (prompt, ")
    assert "max |Δ logprob| 1.5" in lines[0]
    assert len(lines) > 30  # the tables are between the two headlines
    matched = report(good, good)
    text = port_compare.format_report(matched).splitlines()
    assert text[0] == text[-1] and text[0].startswith("verdict: MATCH   max |Δ logprob| ")
    assert set(diverged.to_dict()) == {
        "verdict", "max_abs_diff", "atol", "dtype", "first_divergence", "model", "reference", "base_url",
        "served_name", "top_k", "attn_implementation", "reference_spread", "flat_reference_threshold", "tie_count",
        "position_indexing", "prompts", "hf_load_seconds", "reference_cached", "total_seconds"}


# --- exact ties under a final logit soft-cap ---------------------------------------------------------------

CAP = 30.0
MAX_ENTRIES = 7  # MAX 26.7 returns at most 7 top entries


def capped_rows(length: int, vocab: int = 64, cap: float = CAP, seed: int = 5, saturated: int = 24) -> np.ndarray:
    """Log-softmax rows of cap * tanh(x / cap) in float32 where ``saturated`` ids per row reach exactly the cap."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(0, 10, size=(length - 1, vocab))
    for row in raw:
        row[rng.choice(vocab, saturated, replace=False)] = 20 * CAP  # tanh(20) is exactly 1.0 in float32
    capped = (cap * np.tanh(raw.astype(np.float32) / np.float32(cap))).astype(np.float32)
    return lc.log_softmax(capped)


def max_side_high_ids_first(rows: np.ndarray, tokens: list[int], texts: list[str] | None = None):
    """A correct port that breaks exact ties towards the highest id: its top-k lists the 7 highest tied ids."""
    vocab = rows.shape[1]
    texts = texts or [f"t{i}" for i in range(vocab)]
    index = lc.text_index(texts)
    logprobs, tops = [], []
    for position in range(1, len(tokens)):
        row = rows[position - 1]
        order = sorted(range(vocab), key=lambda i: (-row[i], -i))[:MAX_ENTRIES]
        top = {texts[i]: float(row[i]) for i in order}
        logprobs.append(float(row[tokens[position]]))
        tops.append(lc.resolve_top(top, index))
    return logprobs, tops


def high_id_greedy(rows: np.ndarray, prompt: list[int], generated: int) -> list[int]:
    tokens = list(prompt)
    for position in range(len(prompt), len(prompt) + generated):
        row = rows[position - 1]
        tokens.append(max(range(row.shape[0]), key=lambda i: (row[i], i)))
    return tokens


def capped_case(generated: int = 10, max_cap: float = CAP, **kwargs):
    rows = capped_rows(6 + generated, **kwargs)
    tokens = high_id_greedy(rows, [1, 2, 3, 4, 5, 6], generated)
    served = rows if max_cap == CAP else capped_rows(6 + generated, cap=max_cap, **kwargs)
    logprobs, tops = max_side_high_ids_first(served, tokens)
    return rows, tokens, logprobs, tops


def test_capped_rows_really_tie_beyond_what_max_lists():
    rows = capped_rows(12)
    for row in rows:
        assert int(np.sum(row == row.max())) >= 20 > MAX_ENTRIES


def test_correct_port_with_20_plus_exact_ties_matches_and_counts_them():
    rows, tokens, logprobs, tops = capped_case()
    result = lc.compare_sequence(tokens, 6, rows, logprobs, tops, ATOL, K)
    assert result.verdict == lc.MATCH, result.first_divergence
    greedy = [p for p in result.positions if p.phase == "greedy"]
    assert len(greedy) == 10 and all(p.tie and p.token_id != p.hf_top1 for p in greedy)
    # Prompt positions: MAX's best listed id is a tied id other than HF's first: a top-1 tie, counted too.
    assert result.ties == [p.position for p in result.positions if p.tie]
    assert len(result.ties) == len(result.positions) == 15
    assert result.greedy_tie_at == 6 and result.to_dict()["tie_count"] == 15
    assert lc.tie_count([result, result]) == 30


def test_old_rule_would_have_refused_these_ties():
    """Neither side's top-k holds the other's choice: HF lists low ids, MAX the 7 highest tied ids."""
    rows, tokens, _, tops = capped_case()
    position = 6
    hf_top = set(np.argsort(-rows[position - 1], kind="stable")[:K].tolist())
    assert tokens[position] not in hf_top
    assert int(np.argmax(rows[position - 1])) not in {e.token_id for e in tops[position - 1]}


def test_changed_final_cap_diverges_even_with_ties():
    rows, tokens, logprobs, tops = capped_case(max_cap=25.0)
    result = lc.compare_sequence(tokens, 6, rows, logprobs, tops, ATOL, K)
    assert result.verdict == lc.DIVERGED
    assert result.first_divergence.reason == "logprob" and result.first_divergence.abs_diff > 1.0


def test_tie_token_with_its_own_logprob_off_is_diverged():
    rows, tokens, logprobs, tops = capped_case()
    logprobs = list(logprobs)
    logprobs[6] += 3 * ATOL  # the greedy tie position 7
    result = lc.compare_sequence(tokens, 6, rows, logprobs, tops, ATOL, K)
    assert result.verdict == lc.DIVERGED and result.first_divergence.position == 7
    assert result.first_divergence.reason == "logprob"


def test_greedy_tie_rule_pure_cases():
    row = lc.log_softmax(np.array([[5.0, 5.0, 5.0 - 0.5 * ATOL, 5.0 - 1.5 * ATOL, 0.0]]))[0]
    entry = lambda i, delta=0.0: lc.MaxTopEntry(f"t{i}", i, float(row[i]) + delta)  # noqa: E731
    assert lc.greedy_tie(1, row, [entry(1)], float(row[1]), ATOL)  # exact tie, HF's argmax not listed
    assert lc.greedy_tie(1, row, [entry(1), entry(0)], float(row[1]), ATOL)  # listed and agreeing
    assert lc.greedy_tie(2, row, [entry(2)], float(row[2]), ATOL)  # half a tolerance below the max
    assert not lc.greedy_tie(3, row, [entry(3)], float(row[3]), ATOL)  # 1.5 tolerances below: not a tie
    assert not lc.greedy_tie(1, row, [entry(1)], float(row[1]) + 2 * ATOL, ATOL)  # MAX's own logprob off
    assert not lc.greedy_tie(1, row, [entry(1), entry(0, 2 * ATOL)], float(row[1]), ATOL)  # HF's argmax off
    assert not lc.greedy_tie(4, row, [entry(4)], float(row[4]), ATOL)  # far below


def test_ties_under_shared_text_keys_still_match():
    """Some tied ids decode alike and collapse into one MAX key: those are skipped, the rest still decide."""
    rows, tokens, logprobs, _ = capped_case(generated=4)
    texts = [f"t{i}" for i in range(rows.shape[1])]
    for i in range(0, rows.shape[1], 8):
        texts[i] = texts[i + 1] = f"pair{i}"
    _, tops = max_side_high_ids_first(rows, tokens, texts)
    result = lc.compare_sequence(tokens, 6, rows, logprobs, tops, ATOL, K, decoded=texts)
    assert result.verdict == lc.MATCH, result.first_divergence
    assert all(p.tie for p in result.positions if p.phase == "greedy")
