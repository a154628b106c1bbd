"""Requests of a serving run: when they arrive and how many tokens they read and write.

A :class:`Requests` is columnar (three arrays of one length, sorted by arrival). It comes from

- an arrival process (:data:`ARRIVALS`): ``poisson`` (exponential inter-arrival times) or ``gamma``
  (gamma inter-arrival times of a given coefficient of variation; ``cv > 1`` is burstier than Poisson,
  ``cv = 1`` is Poisson), both of mean rate ``rate_per_s``, with lengths drawn from a
  :class:`LengthModel`; or
- a CSV trace file (:func:`load_arrivals`): header ``arrival_s,prompt_tokens,output_tokens``, one
  request a row, arrivals non-decreasing; size-checked before reading, every bad row named.

Lengths: :data:`AZURE_CONV_2023` is a lognormal per length fitted to the Azure LLM inference trace 2023
(conversation service; Patel et al., "Splitwise", ISCA 2024; data CC-BY at
https://github.com/Azure/AzurePublicDataset, ``data/AzureLLMInferenceTrace_conv.csv``). The fit uses
the sample shipped beside this module (``data/azure_llm_conv_2023_sample.csv``: 718 rows copied from four
windows of that file, at about 18:15, 18:37, 18:52 and 19:09 on 2023-11-16). Windows ``a`` and ``c``
(360 rows) are the fitting set, ``b`` and ``d`` (358 rows) are held out. Each lognormal is the maximum
likelihood fit (``mu``, ``sigma`` = mean and standard deviation of ``ln(tokens)`` of the fitting set; a fit
to median and mean is undefined here: the fitting set's prompt median exceeds its mean);
:func:`length_fit_errors` reports its errors on both sets (docs/serving.md prints them). The trace's
lengths are not lognormal (clusters near 1,000 prompt and 400 output tokens from one client), so expect
errors of tens of percent on some statistics.

Values in, values out: the generators take an ``np.random.Generator``; only :func:`load_arrivals` and
:func:`load_length_sample` read files (the formats of this package's own inputs, as ``workloads.trace``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moebase.units import MiB

ARRIVAL_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
MAX_ARRIVALS_FILE_BYTES = 512 * MiB
MAX_REQUESTS = 10_000_000
MAX_TOKENS_PER_REQUEST = 10_000_000
LENGTH_SAMPLE_PATH = Path(__file__).parent / "data" / "azure_llm_conv_2023_sample.csv"
FIT_WINDOWS, HELD_OUT_WINDOWS = ("a", "c"), ("b", "d")


@dataclass(frozen=True, eq=False)
class Requests:
    """``arrival_s`` [n] float seconds, non-decreasing; ``prompt_tokens`` and ``output_tokens`` [n] int64 >= 1.
    ``source``: where they came from (a file path or the generator's description)."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    source: str = ""

    def __post_init__(self):
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError("arrival_s, prompt_tokens and output_tokens must have one length")
        if n and (np.any(np.diff(self.arrival_s) < 0) or not np.all(np.isfinite(self.arrival_s))
                  or self.arrival_s[0] < 0):
            raise ValueError("arrival_s must be finite, >= 0 and non-decreasing")
        if n and (self.prompt_tokens.min() < 1 or self.output_tokens.min() < 1):
            raise ValueError("prompt_tokens and output_tokens must be >= 1")

    def __len__(self) -> int:
        return len(self.arrival_s)


@dataclass(frozen=True)
class LogNormal:
    """A lognormal token count: ``exp(N(mu, sigma^2))`` rounded, clipped to [``low``, ``high``]."""

    mu: float
    sigma: float
    low: int = 1
    high: int = 32768

    @classmethod
    def from_median_mean(cls, median: float, mean: float, low: int = 1, high: int = 32768) -> "LogNormal":
        """The lognormal of this median and mean (mean must exceed the median: a right skew)."""
        if not 0 < median < mean:
            raise ValueError(f"a lognormal needs 0 < median < mean, got median {median}, mean {mean}")
        return cls(math.log(median), math.sqrt(2.0 * math.log(mean / median)), low, high)

    @classmethod
    def fit(cls, values: np.ndarray, low: int = 1, high: int = 32768) -> "LogNormal":
        """Maximum-likelihood fit: mean and standard deviation of ``ln(values)``."""
        logs = np.log(np.asarray(values, dtype=float))
        return cls(float(logs.mean()), float(logs.std()), low, high)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        x = np.rint(rng.lognormal(self.mu, self.sigma, size=n))
        return np.clip(x, self.low, self.high).astype(np.int64)

    def quantile(self, q: float) -> float:
        """Quantile of the unclipped, unrounded distribution."""
        from statistics import NormalDist
        return math.exp(self.mu + self.sigma * NormalDist().inv_cdf(q))

    @property
    def mean(self) -> float:
        return math.exp(self.mu + self.sigma ** 2 / 2)


@dataclass(frozen=True)
class LengthModel:
    """Prompt and output lengths, drawn independently."""

    prompt: LogNormal
    output: LogNormal
    source: str


def load_length_sample(path: Path = LENGTH_SAMPLE_PATH) -> dict[str, np.ndarray]:
    """The shipped Azure sample: ``{window: int array [rows, 2] of (prompt, output) tokens}``."""
    out: dict[str, list] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["window"], []).append((int(row["prompt_tokens"]), int(row["output_tokens"])))
    return {w: np.array(v, dtype=np.int64) for w, v in out.items()}


def fit_length_model(sample: dict[str, np.ndarray], windows=FIT_WINDOWS) -> LengthModel:
    """Maximum-likelihood lognormals of the prompt and output lengths of ``windows``."""
    rows = np.concatenate([sample[w] for w in windows])
    fits = [LogNormal.fit(rows[:, j]) for j in (0, 1)]
    return LengthModel(fits[0], fits[1], f"lognormal (maximum likelihood) fitted to Azure LLM conversation trace 2023 "
                                         f"windows {', '.join(windows)} ({len(rows)} requests)")


def length_fit_errors(model: LengthModel, sample: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Relative error (model - data) / data of the median, mean and p90 of prompt and output lengths, on the
    fitting windows (``fit``) and on the held-out windows (``held_out``)."""
    out = {}
    for label, windows in (("fit", FIT_WINDOWS), ("held_out", HELD_OUT_WINDOWS)):
        rows = np.concatenate([sample[w] for w in windows])
        errs = {}
        for j, (name, dist) in enumerate((("prompt", model.prompt), ("output", model.output))):
            data = {"median": np.median(rows[:, j]), "mean": rows[:, j].mean(), "p90": np.percentile(rows[:, j], 90)}
            fitted = {"median": dist.quantile(0.5), "mean": dist.mean, "p90": dist.quantile(0.9)}
            for stat in data:
                errs[f"{name}_{stat}"] = float((fitted[stat] - data[stat]) / data[stat])
        out[label] = errs
    return out


#: the maximum-likelihood fit of the fitting windows (a, c) of the shipped sample, cached here;
#: tests/moesim/serve refit it from the sample and compare (one fact: the sample)
AZURE_CONV_2023 = LengthModel(
    prompt=LogNormal(mu=6.4670303272589535, sigma=1.0432038417725669),
    output=LogNormal(mu=5.146042010607662, sigma=0.8775588082419719),
    source="lognormal (maximum likelihood) fitted to Azure LLM conversation trace 2023 windows a, c (360 requests)")

LENGTH_MODELS = {"azure-conv-2023": AZURE_CONV_2023}


def poisson_gaps(n: int, rate_per_s: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Exponential inter-arrival seconds (``cv`` is 1 by nature and not used)."""
    return rng.exponential(1.0 / rate_per_s, size=n)


def gamma_gaps(n: int, rate_per_s: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma inter-arrival seconds of mean ``1 / rate_per_s`` and coefficient of variation ``cv``
    (shape ``1 / cv^2``)."""
    shape = 1.0 / cv ** 2
    return rng.gamma(shape, 1.0 / (rate_per_s * shape), size=n)


#: arrival process name -> inter-arrival generator ``(n, rate_per_s, cv, rng) -> seconds [n]``
ARRIVALS = {"poisson": poisson_gaps, "gamma": gamma_gaps}


def generate(kind: str, rate_per_s: float, duration_s: float, lengths: LengthModel, rng: np.random.Generator,
             *, cv: float = 1.0, max_requests: int | None = None) -> Requests:
    """Requests arriving in [0, ``duration_s``) at mean rate ``rate_per_s`` (see the module docstring)."""
    if kind not in ARRIVALS:
        raise ValueError(f"arrival process must be one of {', '.join(ARRIVALS)}, got {kind!r}")
    if not (rate_per_s > 0 and duration_s > 0 and cv > 0):
        raise ValueError("rate, duration and cv must be > 0")
    expected = rate_per_s * duration_s
    cap = MAX_REQUESTS if max_requests is None else min(max_requests, MAX_REQUESTS)
    if expected > cap * 1.01 and max_requests is None:
        raise ValueError(f"rate x duration = {expected:.0f} requests exceeds the limit of {MAX_REQUESTS}")
    n_draw = int(min(cap, expected + 10 * math.sqrt(expected) * max(cv, 1.0) + 10))
    gaps = ARRIVALS[kind]
    t = np.cumsum(gaps(n_draw, rate_per_s, cv, rng))
    while len(t) < cap and t[-1] < duration_s:  # rare: the draw ended before the duration
        more = np.cumsum(gaps(min(n_draw, cap - len(t)), rate_per_s, cv, rng)) + t[-1]
        t = np.concatenate([t, more])
    t = t[t < duration_s][:cap]
    desc = f"{kind} arrivals at {rate_per_s:g}/s" + (f" (cv {cv:g})" if kind == "gamma" else "")
    return Requests(t, lengths.prompt.sample(len(t), rng), lengths.output.sample(len(t), rng),
                    source=f"{desc} for {duration_s:g} s; lengths: {lengths.source}")


def load_arrivals(path: str | Path) -> Requests:
    """Requests from a CSV file (see the module docstring); ValueError naming the file and row on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"arrivals file {path}: not found")
    size = path.stat().st_size
    if size > MAX_ARRIVALS_FILE_BYTES:
        raise ValueError(f"arrivals file {path}: {size} bytes; files over {MAX_ARRIVALS_FILE_BYTES} bytes are refused")
    cols: list[list] = [[], [], []]
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != ARRIVAL_COLUMNS:
                raise ValueError(f"arrivals file {path}: the header must be {','.join(ARRIVAL_COLUMNS)}, got "
                                 f"{','.join(header) if header else 'an empty file'}")
            for line, row in enumerate(reader, start=2):
                _parse_row(path, line, row, cols)
    except UnicodeDecodeError:
        raise ValueError(f"arrivals file {path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise ValueError(f"arrivals file {path}: not a CSV file ({exc})") from None
    if not cols[0]:
        raise ValueError(f"arrivals file {path}: no requests")
    return Requests(np.array(cols[0], dtype=float), np.array(cols[1], dtype=np.int64),
                    np.array(cols[2], dtype=np.int64), source=str(path))


def _parse_row(path: Path, line: int, row: list[str], cols: list[list]) -> None:
    where = f"arrivals file {path}, row {line}"
    if not row or all(not c.strip() for c in row):
        return
    if len(row) != 3:
        raise ValueError(f"{where}: expected 3 values ({','.join(ARRIVAL_COLUMNS)}), got {len(row)}")
    if len(cols[0]) >= MAX_REQUESTS:
        raise ValueError(f"{where}: more than {MAX_REQUESTS} requests")
    try:
        t = float(row[0])
    except ValueError:
        raise ValueError(f"{where}: arrival_s {row[0]!r} is not a number") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: arrival_s must be finite and >= 0, got {row[0]!r}")
    if cols[0] and t < cols[0][-1]:
        raise ValueError(f"{where}: arrival_s {t:g} is earlier than the row before ({cols[0][-1]:g}); sort by arrival")
    cols[0].append(t)
    for j, name in ((1, "prompt_tokens"), (2, "output_tokens")):
        text = row[j].strip()
        if not text.isdigit() or not 1 <= int(text) <= MAX_TOKENS_PER_REQUEST:
            raise ValueError(f"{where}: {name} must be an integer in [1, {MAX_TOKENS_PER_REQUEST}], got {row[j]!r}")
        cols[j].append(int(text))
