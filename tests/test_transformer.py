"""The translation Transformer: shapes and tied projection, padding that changes nothing,
greedy = beam of width 1, and a beam covering every hypothesis = exhaustive search."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.models import build_model, count_parameters
from kdlab.models.transformer import BOS, EOS, PAD, _normalised


def _tiny(vocab=12, seed=0):
    torch.manual_seed(seed)
    return build_model("transformer-2-16-2", vocab).eval()


def test_sizes_features_and_the_tied_projection():
    base = build_model("transformer-base", 32000)
    # t2t transformer_base with a shared 32k vocabulary: ~60.5M parameters (+ our 32k softmax bias)
    assert 60.0e6 < count_parameters(base) < 61.5e6
    model = _tiny()
    src, tgt = torch.randint(4, 12, (3, 7)), torch.randint(4, 12, (3, 5))
    logits, features = model(src, tgt, return_features=True)
    assert logits.shape == (3, 5, 12) and features.shape == (3, 5, model.feature_dim)
    torch.testing.assert_close(logits, features @ model.embed.weight.T + model.fc_bias)
    state = model.state_dict()
    assert state[f"{model.classifier_name}.weight"].shape == (12, 16)
    with pytest.raises(ValueError, match="divisible"):
        build_model("transformer-2-18-4", 10)


def test_padding_changes_no_output_and_no_gradient():
    """Extra PAD at the end of the source (masked keys) and of the target (causal, and its
    rows dropped from the loss) leaves the loss and every gradient as they were."""
    model = _tiny()
    src, tgt_in, tgt_out = torch.randint(4, 12, (2, 6)), torch.randint(4, 12, (2, 4)), torch.randint(4, 12, (2, 4))

    def loss_and_grads(pad_src: int, pad_tgt: int):
        model.zero_grad()
        s = F.pad(src, (0, pad_src), value=PAD)
        t_in, t_out = F.pad(tgt_in, (0, pad_tgt), value=PAD), F.pad(tgt_out, (0, pad_tgt), value=PAD)
        logits = model(s, t_in)
        keep = t_out != PAD  # the token rows of the loss: padding dropped
        loss = F.cross_entropy(logits[keep], t_out[keep])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(0, 0)
    padded_loss, padded_grads = loss_and_grads(3, 2)
    torch.testing.assert_close(padded_loss, loss)
    for a, b in zip(grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_beam_of_width_one_is_greedy():
    for seed in range(3):
        model = _tiny(seed=seed)
        src = torch.randint(4, 12, (5, 6))
        src[1, 4:] = PAD  # a shorter sentence in the batch
        assert model.beam_search(src, max_len=8, beam=1) == model.greedy(src, max_len=8)
        assert model.beam_search(src, max_len=8, beam=1, temperature=3.0) == model.greedy(src, max_len=8)


def _exhaustive(model, src, max_len, alpha, temperature=1.0):
    tokens = [t for t in range(model.vocab) if t != PAD]
    best, best_score = None, -math.inf
    for length in range(1, max_len + 1):
        for body in itertools.product(tokens, repeat=length):
            if EOS in body[:-1] or (length < max_len and body[-1] != EOS):
                continue  # EOS ends a hypothesis; without EOS only max_len tokens count
            tgt_in = torch.tensor([[BOS, *body[:-1]]])
            logp = F.log_softmax(model(src, tgt_in)[0].float() / temperature, -1)
            score = sum(logp[i, t].item() for i, t in enumerate(body))
            normalised = _normalised([BOS, *body], score, alpha)
            if normalised > best_score:
                best, best_score = [t for t in body if t != EOS], normalised
    return best


def test_a_beam_covering_every_hypothesis_is_exhaustive_search():
    found = set()
    for seed in (1, 2, 4):
        model = _tiny(vocab=6, seed=seed)
        with torch.no_grad():  # larger weights: outputs that depend on the source and the length penalty
            for parameter in model.parameters():
                parameter.mul_(3.0)
        for alpha, temperature in ((0.0, 1.0), (0.6, 1.0), (2.0, 1.0), (0.6, 2.5)):
            for sentence in range(4):
                src = torch.randint(4, 6, (1, 4), generator=torch.Generator().manual_seed(sentence))
                best = _exhaustive(model, src, 3, alpha, temperature)
                assert model.beam_search(src, max_len=3, beam=5 ** 3, alpha=alpha, temperature=temperature)[0] == best
                found.add(tuple(best))
    assert len(found) >= 4  # not one answer everywhere: lengths and tokens differ across the cases


def test_cached_steps_equal_decoding_the_whole_prefix():
    """The key/value cache of ``step`` (and ``reorder``, as beam search uses it) gives the
    logits of ``decode`` on the full prefix."""
    model = _tiny(vocab=20)
    src = torch.randint(4, 20, (3, 6))
    src[1, 4:] = PAD
    memory, mask = model.encode(src)
    prefix = torch.cat([torch.full((3, 1), BOS), torch.randint(4, 20, (3, 5))], 1)
    full = model.decode(prefix, memory, mask)
    state = model.start(memory, mask)
    with torch.no_grad():
        for t in range(prefix.shape[1]):
            torch.testing.assert_close(model.step(prefix[:, t], state), full[:, t], atol=1e-5, rtol=1e-5)
        # reorder rows (2, 0, 0) and go on: the same as decoding the reordered prefixes
        rows = torch.tensor([2, 0, 0])
        model.reorder(state, rows)
        nxt = torch.randint(4, 20, (3,))
        expected = model.decode(torch.cat([prefix[rows], nxt[:, None]], 1), memory[rows], mask[rows])[:, -1]
        torch.testing.assert_close(model.step(nxt, state), expected, atol=1e-5, rtol=1e-5)


def test_beam_search_batched_over_sentences_equals_one_sentence_at_a_time():
    for seed in range(2):
        model = _tiny(vocab=14, seed=seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(2.0)
        src = torch.randint(4, 14, (6, 7), generator=torch.Generator().manual_seed(seed))
        src[2, 3:] = PAD
        src[4, 5:] = PAD
        for beam, alpha, temperature in ((3, 0.6, 1.0), (4, 1.0, 1.5)):
            together = model.beam_search(src, max_len=9, beam=beam, alpha=alpha, temperature=temperature)
            alone = [model.beam_search(src[i : i + 1, : int((src[i] != PAD).sum())], max_len=9, beam=beam,
                                       alpha=alpha, temperature=temperature)[0] for i in range(len(src))]
            assert together == alone
