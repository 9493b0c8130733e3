"""Moving tensors and distributions between tmcgraph's layout and Pyro's plate layout (property tests)."""

import pytest

pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tmcgraph as tg  # noqa: E402
from tmcgraph.pyro.layout import Relaid, from_pyro, relayout, to_pyro  # noqa: E402
from tmcgraph.sampling.samplers import draw_sample  # noqa: E402


@st.composite
def layouts(draw):
    """(m, positions of the site's plates (ascending), their sizes, lead sizes, event shape)."""
    m = draw(st.integers(0, 3))
    positions = tuple(sorted(draw(st.sets(st.integers(-m, -1), max_size=m)))) if m else ()
    sizes = tuple(draw(st.integers(2, 3)) for _ in positions)
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    event = tuple(draw(st.lists(st.integers(1, 2), max_size=1)))
    return m, positions, sizes, lead, event


def pyro_layout(m, positions, sizes):
    shape = [1] * m
    for p, s in zip(positions, sizes):
        shape[m + p] = s
    return shape


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_to_pyro_puts_each_plate_at_its_dim(case):
    m, positions, sizes, lead, event = case
    t = torch.randn([*lead, *sizes, *event])
    out = to_pyro(t, positions, m, len(event))
    assert list(out.shape) == list(lead) + pyro_layout(m, positions, sizes) + list(event)
    assert torch.equal(out.reshape(t.shape), t)
    for p, s in zip(positions, sizes):  # the plate's elements sit along Pyro's dim p (counted before event)
        assert out.shape[p - len(event)] == s


@settings(max_examples=60, deadline=None)
@given(layouts(), st.booleans())
def test_from_pyro_reads_values_pyro_produced(case, broadcast):
    m, positions, sizes, _, event = case
    full = pyro_layout(m, positions, sizes)
    t = torch.randn([*full, *event])
    # Pyro may drop leading singleton batch dims: right-aligned shapes are the same value
    n = next((i for i, s in enumerate(full) if s != 1), m)
    short = t.reshape(full[n:] + list(event))
    names = tuple(f"p{i}" for i in range(len(positions)))
    out = from_pyro(short, "v", names, positions, sizes, m, len(event))
    assert tuple(out.shape) == sizes + event
    assert torch.equal(out.reshape(-1), t.reshape(-1))
    if broadcast and positions:  # a value broadcast along a plate is expanded
        one = torch.randn(list(event))
        out = from_pyro(one, "v", names, positions, sizes, m, len(event))
        assert tuple(out.shape) == sizes + event and torch.equal(out[(0,) * len(sizes)], one)


@settings(max_examples=60, deadline=None)
@given(layouts(), st.booleans())
def test_relayout_and_the_wrapper_agree(case, independent):
    m, positions, sizes, lead, event = case
    if independent and not event:
        event = (2,)
    shape = list(lead) + pyro_layout(m, positions, sizes)
    loc = torch.randn([*shape, *event], dtype=torch.float64)
    d = dist.Normal(loc, 1.5)
    d = d.to_event(len(event)) if event else d
    want_batch = list(lead) + list(sizes)
    rebuilt = relayout(d, "v", positions, m)
    drop = [i - len(d.batch_shape) for i in range(len(d.batch_shape))
            if i >= len(lead) and (i - len(d.batch_shape)) not in positions]
    wrapped = Relaid(d, drop)
    assert list(rebuilt.batch_shape) == want_batch and list(wrapped.batch_shape) == want_batch
    assert not isinstance(rebuilt, Relaid)  # Normal and Independent are rebuilt, not wrapped
    value = torch.randn([3, *want_batch, *event], dtype=torch.float64)
    assert torch.allclose(rebuilt.log_prob(value), wrapped.log_prob(value))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = draw_sample(rebuilt, torch.Size([2]), g1)
    b = draw_sample(wrapped, torch.Size([2]), g2)
    assert torch.equal(a, b) and list(a.shape) == [2] + want_batch + list(event)
    assert list(wrapped.expand([4] + want_batch).batch_shape) == [4] + want_batch


def test_relayout_casts_and_wraps_what_it_cannot_rebuild():
    d = dist.Normal(torch.zeros(3, 1, 1), 1.0)
    r = relayout(d, "v", (), 2, dtype=torch.float64)
    assert r.batch_shape == (3,) and r.loc.dtype == torch.float64
    mix = dist.MixtureSameFamily(dist.Categorical(torch.ones(3, 1, 2)), dist.Normal(torch.zeros(3, 1, 2), 1.0))
    w = relayout(mix, "v", (), 1)
    assert isinstance(w, Relaid) and w.batch_shape == (3,)
    assert torch.allclose(w.log_prob(torch.zeros(3)), mix.log_prob(torch.zeros(3, 1)).reshape(3))
    with pytest.raises(tg.TMCGraphError, match="site 'v'.*size 3 at dim -1"):
        relayout(dist.Normal(torch.zeros(3), 1.0), "v", (), 1)
    with pytest.raises(tg.TMCGraphError, match="site 'v'.*size 4 at dim -1"):
        from_pyro(torch.zeros(4), "v", ("a",), (-2,), (3,), 2, 0)
