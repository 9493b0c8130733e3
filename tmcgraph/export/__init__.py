"""Exports of TMC posteriors to other libraries' formats (applications; not imported by ``import tmcgraph``).

* :mod:`tmcgraph.export.arviz`: ``arviz.InferenceData`` (or ``xarray.DataTree`` with
  arviz >= 1.0) with posterior draws, log-likelihoods, effective sample sizes and the
  data. Needs the ``arviz`` extra (``pip install "tmcgraph[arviz]"``); arviz itself is
  imported only when a function is called.
"""

from .arviz import from_estimator, to_inference_data

__all__ = ["to_inference_data", "from_estimator"]
