"""Every validation path raises TMCGraphError (a ValueError) naming what is at fault."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, Normal

import tmcgraph as tg
from tmcgraph import TMCGraphError


def toy(N=3):
    m = tg.Model()
    m.plate("data", size=N)
    m.latent("theta", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda theta: Normal(theta, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.0))
    q.latent("z", lambda: Normal(0.0, 1.5), plate="data")
    return m, q


def raises(match):
    return pytest.raises(TMCGraphError, match=match)


def test_error_type_is_value_error():
    assert issubclass(TMCGraphError, ValueError)


def test_cycle_in_model():
    m = tg.Model()
    m.latent("a", lambda b: Normal(b, 1.0))
    m.latent("b", lambda a: Normal(a, 1.0))
    with raises(r"model graph has a cycle: (a -> b -> a|b -> a -> b)"):
        m.validate()


def test_cycle_in_proposal():
    m = tg.Model()
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.latent("b", lambda: Normal(0.0, 1.0))
    m.observed("x", lambda a, b: Normal(a + b, 1.0))
    q = tg.Proposal(m)
    q.latent("a", lambda b: Normal(b, 1.0))
    q.latent("b", lambda a: Normal(a, 1.0))
    with raises("proposal graph has a cycle"):
        tg.TMC(m, q)


def test_latent_without_proposal():
    m, _ = toy()
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.0))
    with raises(r"latent\(s\) \['z'\] have no proposal"):
        tg.TMC(m, q)


def test_proposal_for_unknown_variable():
    m, q = toy()
    with raises("proposal for unknown variable 'w'"):
        q.latent("w", lambda: Normal(0.0, 1.0))


def test_proposal_for_observed_variable():
    m, q = toy()
    with raises("proposal for observed variable 'x'"):
        q.latent("x", lambda: Normal(0.0, 1.0))


def test_unknown_parent_in_model():
    m = tg.Model()
    m.latent("a", lambda bogus: Normal(bogus, 1.0))
    with raises("model variable 'a' has unknown parent 'bogus' \\(edge 'bogus' -> 'a'\\)"):
        m.validate()


def test_unknown_parent_in_proposal():
    m, _ = toy()
    q = tg.Proposal(m)
    q.latent("theta", lambda nope: Normal(nope, 1.0))
    q.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    with raises("proposal for 'theta' has unknown parent 'nope'"):
        tg.TMC(m, q)


def test_missing_and_extra_data():
    m, q = toy()
    est = tg.TMC(m, q, K=2)
    with raises(r"no data for observed variable\(s\) \['x'\]"):
        est.log_evidence({})
    with raises("data for variable.*'z': 'a latent'"):
        est.log_evidence({"x": torch.zeros(3), "z": torch.zeros(3)})
    with raises("not in the model"):
        est.log_evidence({"x": torch.zeros(3), "y": torch.zeros(3)})


def test_wrong_plate_size():
    m, q = toy(N=3)
    with raises("data for 'x' has size 4 along plate 'data'.*declaration gives size 3"):
        tg.TMC(m, q).log_evidence({"x": torch.zeros(4)})


def test_inconsistent_plate_sizes_between_data():
    m = tg.Model()
    m.plate("data")
    m.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    m.observed("y", lambda z: Normal(z, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    with raises("data for 'y' has size 5 along plate 'data'.*data for 'x' gives size 3"):
        tg.TMC(m, q).log_evidence({"x": torch.zeros(3), "y": torch.zeros(5)})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_data(bad):
    m, q = toy()
    x = torch.tensor([0.0, bad, 1.0])
    with raises(r"data for 'x' has non-finite values \(first at index \[1\]\)"):
        tg.TMC(m, q).log_evidence({"x": x})


def test_data_missing_plate_dims():
    m, q = toy()
    with raises(r"data for 'x' has shape \(\) but lies in plates \('data',\)"):
        tg.TMC(m, q).log_evidence({"x": torch.tensor(1.0)})


def test_unplated_variable_with_plated_parent():
    m = tg.Model()
    m.plate("data", size=3)
    m.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    m.latent("g", lambda z: Normal(z.sum(), 1.0))
    with raises("edge 'z' -> 'g': 'g' is outside plate\\(s\\) \\['data'\\] of its parent 'z'"):
        m.validate()


def test_proposal_latent_parent_in_extra_plate():
    m = tg.Model()
    m.plate("data", size=3)
    m.latent("g", lambda: Normal(0.0, 1.0))
    m.latent("z", lambda g: Normal(g, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    q.latent("g", lambda z: Normal(z.mean(), 1.0))
    with raises("proposal edge 'z' -> 'g'.*outside plate"):
        tg.TMC(m, q)


def test_batch_shape_does_not_match_plate():
    m = tg.Model()
    m.plate("data", size=3)
    m.latent("z", lambda: Normal(torch.zeros(5), 1.0), plate="data")
    m.observed("x", lambda z: Normal(z, 1.0), plate="data")
    q = tg.Proposal(m)
    q.latent("z", lambda: Normal(torch.zeros(3), 1.0), plate="data")
    with raises(r"model distribution of 'z' has batch shape \(5,\).*data=3"):
        tg.TMC(m, q, K=2).log_evidence({"x": torch.zeros(3)})
    q2 = tg.Proposal(m)
    q2.latent("z", lambda: Normal(torch.zeros(4), 1.0), plate="data")
    with raises(r"proposal distribution of 'z' has batch shape \(4,\)"):
        tg.TMC(m, q2, K=2).log_evidence({"x": torch.zeros(3)})


def test_vector_latent_without_independent():
    m = tg.Model()
    m.latent("z", lambda: Independent(Normal(torch.zeros(2), 1.0), 1))
    m.observed("x", lambda z: Normal(z, 1.0))  # batch (2,), should be Independent
    q = tg.Proposal(m)
    q.latent("z", lambda: Independent(Normal(torch.zeros(2), 1.0), 1))
    with raises("likelihood (distribution|log_prob) of 'x'"):
        tg.TMC(m, q, K=3).log_evidence({"x": torch.zeros(2)})


def test_proposal_event_shape_mismatch():
    m = tg.Model()
    m.latent("z", lambda: Independent(Normal(torch.zeros(2), 1.0), 1))
    m.observed("x", lambda z: Normal(z.sum(-1), 1.0))
    q = tg.Proposal(m)
    q.latent("z", lambda: Independent(Normal(torch.zeros(3), 1.0), 1))
    with raises("'z'"):
        tg.TMC(m, q, K=3).log_evidence({"x": torch.tensor(0.0)})


def test_paired_coupling_with_unequal_K():
    m, _ = toy()
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.0), K=3)
    q.latent("z", lambda theta: Normal(theta, 1.0), plate="data", coupling="paired", K=4)
    with raises("paired coupling on edge 'theta' -> 'z' needs equal K"):
        tg.TMC(m, q).log_evidence({"x": torch.zeros(3)})


def test_enumerate_continuous_latent():
    m, _ = toy()
    q = tg.Proposal(m)
    q.enumerate("theta")
    q.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    with raises("'theta' is marked for enumeration but Normal has no enumerable support"):
        tg.TMC(m, q).log_evidence({"x": torch.zeros(3)})


def test_elementwise_with_global_latent():
    m, q = toy()
    with raises("cannot keep plate 'data' per element"):
        tg.TMC(m, q, K=2).log_evidence({"x": torch.zeros(3)}, elementwise=True)
    with raises("unknown plate 'nope'"):
        tg.TMC(m, q, K=2).log_evidence({"x": torch.zeros(3)}, elementwise="nope")


def test_crossed_plates_are_rejected():
    m = tg.Model()
    m.plate("rows", size=2)
    m.plate("cols", size=3)
    m.latent("u", lambda: Normal(0.0, 1.0), plate="rows")
    m.latent("v", lambda: Normal(0.0, 1.0), plate="cols")
    m.observed("x", lambda u, v: Normal(u * v, 1.0), plate=("rows", "cols"))
    q = tg.Proposal(m)
    q.latent("u", lambda: Normal(0.0, 1.0), plate="rows")
    q.latent("v", lambda: Normal(0.0, 1.0), plate="cols")
    with raises(r"crossed plates: latent\(s\) \['v'\] in plates \['cols'\] and \['u'\] in plates \['rows'\]"):
        tg.TMC(m, q, K=2)  # at validation, before any data


def test_declaration_errors():
    m = tg.Model()
    m.plate("data", size=2)
    with raises("plate 'data' is declared twice"):
        m.plate("data")
    with raises("size must be a positive integer"):
        m.plate("p2", size=0)
    with raises("undeclared plate 'nope'"):
        m.latent("a", lambda: Normal(0.0, 1.0), plate="nope")
    m.latent("a", lambda: Normal(0.0, 1.0))
    with raises("variable 'a' is declared twice"):
        m.latent("a", lambda: Normal(0.0, 1.0))
    with raises("must be an identifier"):
        m.latent("_hidden", lambda: Normal(0.0, 1.0))
    with raises("takes \\*args/\\*\\*kwargs"):
        m.latent("b", lambda *a: Normal(0.0, 1.0))
    q = tg.Proposal(m)
    with raises("coupling must be a name or a coupling object"):
        q.latent("a", lambda: Normal(0.0, 1.0), coupling=3)
    q2 = tg.Proposal(m)
    q2.latent("a", lambda: Normal(0.0, 1.0), coupling="grid")  # names are checked when an estimator is built
    with raises("proposal for 'a': unknown coupling 'grid'"):
        tg.TMC(m, q2)
    with raises("K must be a positive integer"):
        q.latent("a", lambda: Normal(0.0, 1.0), K=0)
    with raises("plates \\('data',\\) but the model declares \\(\\)"):
        q.latent("a", lambda: Normal(0.0, 1.0), plate="data")
    with raises("Proposal needs a Model"):
        tg.Proposal(object())


def test_estimator_option_errors():
    m, q = toy()
    with raises("K must be a positive integer"):
        tg.TMC(m, q, K=0)
    with raises("unknown path strategy 'fastest'"):
        tg.TMC(m, q, strategy="fastest")
    with raises("dtype must be a floating dtype"):
        tg.TMC(m, q, dtype=torch.int64)
    other, _ = toy()
    with raises("different model"):
        tg.TMC(other, q)
    with raises("VAE uses K=1"):
        tg.VAE(m, q, K=4)
    with raises("method must be"):
        tg.log_evidence(m, q, {"x": torch.zeros(3)}, method="smc-ish")
    with raises("data must be a dict"):
        tg.TMC(m, q).log_evidence(torch.zeros(3))


def test_callable_failure_names_variable_and_parent_shapes():
    m = tg.Model()
    m.latent("a", lambda: Normal(0.0, 1.0))
    m.observed("x", lambda a: Normal(a @ torch.ones(7), 1.0))
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.0))
    with raises(r"latent callable of 'x'|observed callable of 'x' failed with parents \(a: \(4,\)\)"):
        tg.TMC(m, q, K=4).log_evidence({"x": torch.tensor(0.0)})


def test_callable_returning_non_distribution():
    m = tg.Model()
    m.latent("a", lambda: torch.zeros(()))
    m.observed("x", lambda a: Normal(a, 1.0))
    q = tg.Proposal(m)
    q.latent("a", lambda: Normal(0.0, 1.0))
    with raises("latent callable of 'a' returned Tensor, expected a torch.distributions.Distribution"):
        tg.TMC(m, q, K=2).log_evidence({"x": torch.tensor(0.0)})


def test_iwae_rejects_per_latent_K():
    m, _ = toy()
    q = tg.Proposal(m)
    q.latent("theta", lambda: Normal(0.0, 1.0), K=5)
    q.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    with raises("IWAE shares one sample dim of size K=3; proposal for 'theta' sets K=5"):
        tg.IWAE(m, q, K=3).log_evidence({"x": torch.zeros(3)})


def test_unknown_plate_size():
    m = tg.Model()
    m.plate("data")
    m.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    m.observed("x", lambda z: Normal(z.sum(), 1.0), parents=[])
    q = tg.Proposal(m)
    q.latent("z", lambda: Normal(0.0, 1.0), plate="data")
    with raises(r"size of plate\(s\) \['data'\] is unknown"):
        tg.TMC(m, q).log_evidence({"x": torch.tensor(0.0)})


def test_categorical_enumeration_support_used():
    m = tg.Model()
    m.latent("c", lambda: Categorical(probs=torch.tensor([0.2, 0.3, 0.5])))
    m.observed("x", lambda c: Normal(c.double(), 1.0))
    q = tg.Proposal(m)
    q.enumerate("c")
    r = tg.TMC(m, q).run({"x": torch.tensor(1.0, dtype=torch.float64)})
    assert r.samples.sizes["c"] == 3
    assert r.samples.values["c"].tolist() == [0, 1, 2]
