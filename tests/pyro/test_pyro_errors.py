"""What a static factor graph cannot express is refused with a TMCGraphError naming the site or plate."""

import pytest

pyro = pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402

import tmcgraph as tg  # noqa: E402
from tmcgraph.pyro import TMC, TraceTMC_ELBO  # noqa: E402

X = torch.tensor(1.0)


def guide_z(x):
    pyro.sample("z", dist.Normal(0.0, 1.0), infer={"num_samples": 4})


def model_z(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def empty_guide(x):
    pass


def refused(model, guide, match, mpn=0, x=X, **kw):
    with pytest.raises(tg.TMCGraphError, match=match) as e:
        TMC(model, guide, max_plate_nesting=mpn, **kw).log_evidence(x, seed=0)
    return str(e.value)


def test_branching_on_a_sampled_value():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = 1.0 if z > 0 else -1.0  # Python control flow on a sample: no provenance
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    msg = refused(model, guide_z, "'z'")
    assert "'x'" in msg and "control flow" in msg


def test_site_existence_depending_on_a_sampled_value():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        for i in range(int(abs(z.item()) * 3) + 1):
            pyro.sample(f"w{i}", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    msg = refused(model, guide_z, "structure changes|several values")
    assert "'w" in msg or "'z'" in msg


def test_retraces_compare_site_sets():
    """Traces with different draws must have the same sites; the first differing one is named."""
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if float(z) > 0:
            pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if float(z) > 0:
            pyro.sample("w", dist.Normal(0.0, 1.0))

    msg = refused(model, guide, "structure changes", retraces=8)
    assert "'w'" in msg or "'x'" in msg


def test_pyro_markov_is_refused():
    def model(x):
        z = torch.tensor(0.0)
        for t in pyro.markov(range(3)):
            z = pyro.sample(f"z_{t}", dist.Normal(z, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        for t in range(3):
            pyro.sample(f"z_{t}", dist.Normal(0.0, 1.0))

    refused(model, guide, "'z_0'.*pyro.markov")


def test_subsampled_plate_is_refused():
    def model(x):
        with pyro.plate("data", 10, subsample_size=3):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.zeros(3))

    refused(model, empty_guide, "plate 'data' is subsampled", mpn=1)


def test_guide_site_missing_from_the_model():
    def guide(x):
        guide_z(x)
        pyro.sample("aux", dist.Normal(0.0, 1.0))

    refused(model_z, guide, "guide site 'aux' does not appear in the model")


def test_observed_site_in_the_guide():
    def guide(x):
        guide_z(x)
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    refused(model_z, guide, "guide site 'x' is observed")


def test_dependence_on_a_plate_the_site_is_not_in():
    def model(x):
        with pyro.plate("p", 3):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(a.sum(-1), 1.0), obs=x)

    def guide(x):
        with pyro.plate("p", 3):
            pyro.sample("a", dist.Normal(0.0, 1.0), infer={"num_samples": 2})

    refused(model, guide, "site 'x' depends on site 'a' inside plate 'p'", mpn=1)


def test_scaled_and_masked_sites():
    def scaled(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with poutine.scale(scale=2.0):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def masked(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=torch.tensor(False)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    refused(scaled, guide_z, "site 'x' has log-probability scale 2.0")
    refused(masked, guide_z, "site 'x' is masked")


def test_sequential_enumeration_and_unknown_tmc_strategy():
    def seq_guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0), infer={"enumerate": "sequential"})

    def bad_tmc(x):
        pyro.sample("z", dist.Normal(0.0, 1.0), infer={"num_samples": 3, "tmc": "triangular"})

    refused(model_z, seq_guide, "site 'z' has infer enumerate='sequential'")
    refused(model_z, bad_tmc, "site 'z': unknown tmc='triangular'")


def test_batch_dims_that_are_not_plates():
    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))
        pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))

    refused(model, guide, "site 'z' has batch shape \\(3,\\)")
    refused(model, guide, "site 'z' has batch shape \\(3,\\), with size 3 at dim -1", mpn=1)


def test_programs_that_do_not_broadcast_over_sample_dims():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.reshape(()), 1.0), obs=x)  # assumes z is a scalar

    refused(model, guide_z, "site 'z'.*(broadcast|several values)")


def test_plate_beyond_max_plate_nesting_and_bad_arguments():
    def model(x):
        with pyro.plate("data", 2, dim=-2):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.zeros(2, 1))

    refused(model, empty_guide, "plate 'data' at dim -2, beyond max_plate_nesting=1", mpn=1)
    with pytest.raises(tg.TMCGraphError, match="max_plate_nesting"):
        TMC(model_z, guide_z, max_plate_nesting=-1)
    with pytest.raises(tg.TMCGraphError, match="K must be"):
        TMC(model_z, guide_z, K=0)
    with pytest.raises(tg.TMCGraphError, match="callables"):
        TMC(model_z, None)
    with pytest.raises(tg.TMCGraphError, match="elementwise: unknown plate 'nope'"):
        TMC(model_z, guide_z, max_plate_nesting=0).log_evidence(X, elementwise="nope")


def test_paired_coupling_with_unequal_particle_numbers_names_the_edge():
    def guide(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0), infer={"num_samples": 3})
        pyro.sample("z", dist.Normal(a, 1.0), infer={"num_samples": 4, "tmc": "diagonal"})

    def model(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        z = pyro.sample("z", dist.Normal(a, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    refused(model, guide, "'a' -> 'z'")


def test_elbo_reports_the_same_errors():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with poutine.scale(scale=0.5):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(tg.TMCGraphError, match="site 'x'"):
        TraceTMC_ELBO(max_plate_nesting=0).loss(model, guide_z, X)
