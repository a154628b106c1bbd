"""The interconnect of a System as a directed networkx graph, and all-to-all routing over it.

Nodes: ``dev{i}`` for each device, ``switch{n}`` for node n's scale-up switch (NVSwitch or
the RDU peer network), ``net`` for the scale-out fabric, ``host{n}`` for node n's host.
Every edge is one direction of a link and carries ``kind``, ``bandwidth_bytes_per_s`` and
``latency_s``. Traffic between two devices of one node goes ``dev -> switch -> dev``;
between nodes ``dev -> net -> dev`` (GPUDirect RDMA through each device's own NIC).

Latency: a spec's ``latency_s`` is the start-up latency of a transfer *through* that link class, switch
included (e.g. "NCCL all-to-all start-up latency over NVSwitch"), not the latency of one hop. So a route
is charged its slowest hop's latency once -- the maximum over its edges, not their sum, which would
count the switch twice -- and one all-to-all adds the largest route latency among the pairs that
exchange data (:meth:`AllToAllRouting.duration_s`).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
from scipy import sparse

from hwmodels.specs import System
from moebase.limits import check_alloc


def build_graph(system: System) -> nx.DiGraph:
    g = nx.DiGraph(name=system.name)
    for n in range(system.num_nodes):
        g.add_node(f"switch{n}", role="switch")
        g.add_node(f"host{n}", role="host")
    if system.num_nodes > 1:
        g.add_node("net", role="network")
    for d in range(system.num_devices):
        n = system.node_of(d)
        dev = f"dev{d}"
        g.add_node(dev, role="device", node=n)
        for a, b in ((dev, f"switch{n}"), (f"switch{n}", dev)):
            g.add_edge(a, b, kind=system.scale_up.kind, bandwidth_bytes_per_s=system.scale_up.bandwidth_bytes_per_s,
                       latency_s=system.scale_up.latency_s)
        for a, b in ((dev, f"host{n}"), (f"host{n}", dev)):
            g.add_edge(a, b, kind=system.host_link.kind, bandwidth_bytes_per_s=system.host_link.bandwidth_bytes_per_s,
                       latency_s=system.host_link.latency_s)
        if system.num_nodes > 1:
            so = system.scale_out
            for a, b in ((dev, "net"), ("net", dev)):
                g.add_edge(a, b, kind=so.kind, bandwidth_bytes_per_s=so.bandwidth_bytes_per_s, latency_s=so.latency_s)
    return g


@dataclass(frozen=True)
class AllToAllRouting:
    """Precomputed routes of every (src, dst) device pair over the graph's edges.

    ``incidence[e, src * D + dst]`` is 1 when the route from src to dst uses edge e.
    ``edge_names[e]`` is ``"a->b"``; ``pair_latency_s[src, dst]`` is the route's latency: the largest
    edge latency on it (see the module docstring; 0 on the diagonal). Device-local traffic (src == dst)
    uses no edge.
    """

    edge_names: tuple[str, ...]
    edge_kinds: tuple[str, ...]
    edge_bandwidth_bytes_per_s: np.ndarray  # [E]
    incidence: "sparse.csr_matrix | np.ndarray"  # [E, D*D], 0/1
    pair_latency_s: np.ndarray  # [D, D]

    def edge_bytes(self, pair_bytes: np.ndarray) -> np.ndarray:
        """Bytes on each edge for a [D, D] matrix of bytes sent from src (row) to dst (column)."""
        return self.incidence @ pair_bytes.ravel()

    def exchange(self, pair_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(bytes on each edge [E], mask of the device pairs that exchange bytes [D, D]) of one all-to-all,
        device-local traffic (the diagonal) left out; None when nothing crosses a link."""
        off_diag = pair_bytes.copy()
        np.fill_diagonal(off_diag, 0)
        if not off_diag.any():
            return None
        return self.edge_bytes(off_diag), off_diag > 0

    def duration_s(self, pair_bytes: np.ndarray) -> float:
        """Bottleneck-link time of one all-to-all: max over edges of bytes / bandwidth, plus the largest
        route latency among the pairs that exchange bytes. Zero when nothing crosses a link."""
        ex = self.exchange(pair_bytes)
        if ex is None:
            return 0.0
        edge_bytes, pairs = ex
        busy_s = edge_bytes / self.edge_bandwidth_bytes_per_s
        return float(busy_s.max() + self.pair_latency_s[pairs].max())


def all_to_all_routing(system: System) -> AllToAllRouting:
    """Routes of every device pair, vectorised, with a sparse incidence matrix (a dense one is
    [4D, D*D]: 512 MiB at 256 devices). Equal to :func:`all_to_all_routing_by_paths` (tested).
    Refuses (before building anything) a system whose device pairs would not fit in memory."""
    check_alloc(f"all-to-all routes of {system.name!r} ({system.num_devices:,} devices: pairs x route arrays)",
                (system.num_devices, system.num_devices, 6), 8, hint="simulate fewer nodes")
    graph = build_graph(system)
    edges = _a2a_edges(graph)
    index = {e: i for i, e in enumerate(edges)}
    d_count = system.num_devices
    dev = np.arange(d_count)
    node = dev // system.devices_per_node
    up_out = np.array([index[(f"dev{d}", f"switch{n}")] for d, n in zip(dev, node)])
    up_in = np.array([index[(f"switch{n}", f"dev{d}")] for d, n in zip(dev, node)])
    multi = system.num_nodes > 1
    so_out = np.array([index[(f"dev{d}", "net")] for d in dev]) if multi else up_out
    so_in = np.array([index[("net", f"dev{d}")] for d in dev]) if multi else up_in
    src, dst = np.meshgrid(dev, dev, indexing="ij")
    src, dst = src.ravel(), dst.ravel()
    off = src != dst
    same = node[src] == node[dst]
    first = np.where(same, up_out[src], so_out[src])[off]
    second = np.where(same, up_in[dst], so_in[dst])[off]
    cols = (src * d_count + dst)[off]
    incidence = sparse.csr_matrix((np.ones(2 * len(cols)), (np.concatenate([first, second]), np.concatenate([cols, cols]))),
                                  shape=(len(edges), d_count * d_count))
    lat_up = system.scale_up.latency_s
    lat_so = system.scale_out.latency_s if multi else lat_up
    latency = np.where(same, lat_up, lat_so).reshape(d_count, d_count).astype(float)
    np.fill_diagonal(latency, 0.0)
    return _routing(graph, edges, incidence, latency)


def _a2a_edges(graph: nx.DiGraph) -> list[tuple[str, str]]:
    return [(a, b) for a, b in graph.edges() if not (a.startswith("host") or b.startswith("host"))]


def _routing(graph, edges, incidence, latency) -> AllToAllRouting:
    return AllToAllRouting(
        edge_names=tuple(f"{a}->{b}" for a, b in edges),
        edge_kinds=tuple(graph.edges[e]["kind"] for e in edges),
        edge_bandwidth_bytes_per_s=np.array([graph.edges[e]["bandwidth_bytes_per_s"] for e in edges]),
        incidence=incidence,
        pair_latency_s=latency,
    )


def all_to_all_routing_by_paths(system: System, graph: nx.DiGraph | None = None) -> AllToAllRouting:
    """Reference build: walks each pair's path on the graph (dense, O(D^2) Python; for tests and small systems)."""
    graph = graph if graph is not None else build_graph(system)
    edges = _a2a_edges(graph)
    index = {e: i for i, e in enumerate(edges)}
    d_count = system.num_devices
    incidence = np.zeros((len(edges), d_count * d_count))
    latency = np.zeros((d_count, d_count))
    for src in range(d_count):
        for dst in range(d_count):
            if src == dst:
                continue
            if system.node_of(src) == system.node_of(dst):
                path = [f"dev{src}", f"switch{system.node_of(src)}", f"dev{dst}"]
            else:
                path = [f"dev{src}", "net", f"dev{dst}"]
            for a, b in zip(path, path[1:]):
                incidence[index[(a, b)], src * d_count + dst] = 1.0
            # one start-up latency per hop class: the route's slowest hop
            latency[src, dst] = max(graph.edges[a, b]["latency_s"] for a, b in zip(path, path[1:]))
    return _routing(graph, edges, incidence, latency)
