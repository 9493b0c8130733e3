"""The naive oracle takes a factor graph, or factors with their ordinals (and a kept plate)."""

import torch

import tmcgraph as tg


def test_both_call_forms_agree_and_match_hand_enumeration():
    g = torch.Generator().manual_seed(0)
    a = tg.Factor("a", torch.randn(2, generator=g, dtype=torch.float64), ("i",), ())
    b = tg.Factor("b", torch.randn(2, 3, 2, generator=g, dtype=torch.float64), ("i", "j"), ("p",))
    ordinals = {"i": (), "j": ("p",)}
    graph = tg.FactorGraph((a, b), ordinals)
    # hand enumeration: sum_i exp(a_i) prod_p sum_j exp(b_ijp)
    truth = torch.logsumexp(a.tensor + torch.logsumexp(b.tensor, 1).sum(-1), 0)
    torch.testing.assert_close(tg.brute_force(graph), truth)
    torch.testing.assert_close(tg.brute_force([a, b], ordinals), truth)
    c = tg.Factor("c", torch.randn(3, 2, generator=g, dtype=torch.float64), ("j",), ("p",))
    per = tg.brute_force(tg.FactorGraph((c,), {"j": ("p",)}, keep="p"))
    torch.testing.assert_close(per, torch.logsumexp(c.tensor, 0))
    torch.testing.assert_close(tg.brute_force([c], {"j": ("p",)}, keep="p"), per)
