"""Design-space studies: a ``study.toml`` expands to configurations, each evaluated by the replay
engines (:mod:`moesim.sim` or :mod:`moesim.analytic`) into one row of a results table.

- :mod:`moesim.study.spec`: parse and validate ``study.toml`` into a list of configurations;
- :mod:`moesim.study.traffic`: the traffic (routing traces) a configuration names;
- :mod:`moesim.study.evaluate`: one configuration -> one row (all inputs and outputs);
- :mod:`moesim.study.runner`: run a study (serial, local process pool or Dask), resumable.
"""

from moesim.study.spec import PARAMETERS, Study, load_study

__all__ = ["PARAMETERS", "Study", "load_study"]
