"""Memory tiers and the processor-sharing link: exact transfer times, fair sharing, bad input."""

import pytest
import simpy

from hwmodels.specs import MemoryTier, load_system
from moesim.memory.tiers import MemoryHierarchy, SharedLink, SimMemory, transfer_time_s


def _run_transfers(bw, latency, jobs):
    """jobs: list of (start_at_s, nbytes). Returns finish instants in job order."""
    env = simpy.Environment()
    link = SharedLink(env, "l", bw, latency)
    done = [None] * len(jobs)

    def job(i, start, nbytes):
        if start:
            yield env.timeout(start)
        yield link.transfer(nbytes)
        done[i] = env.now

    for i, (start, nbytes) in enumerate(jobs):
        env.process(job(i, start, nbytes))
    env.run()
    return done, link


@pytest.mark.parametrize("nbytes,bw,lat", [(1e9, 64e9, 2e-6), (13.48e9, 100e9, 7e-7), (3.0, 7.0, 0.0), (12345.0, 1e3, 0.25)])
def test_single_transfer_is_bytes_over_bandwidth_plus_latency_exactly(nbytes, bw, lat):
    done, link = _run_transfers(bw, lat, [(0.0, nbytes)])
    assert done[0] == nbytes / bw + lat
    assert transfer_time_s(nbytes, bw, lat) == nbytes / bw + lat
    assert link.bytes_moved == nbytes


def test_two_concurrent_transfers_each_take_twice_as_long():
    alone, _ = _run_transfers(100.0, 0.0, [(0.0, 1000.0)])
    both, _ = _run_transfers(100.0, 0.0, [(0.0, 1000.0), (0.0, 1000.0)])
    assert alone[0] == 10.0
    assert both[0] == pytest.approx(2 * alone[0], rel=1e-12)
    assert both[1] == pytest.approx(2 * alone[0], rel=1e-12)


def test_processor_sharing_with_staggered_arrivals_matches_hand_computation():
    # bw 100 B/s. A: 100 B at t=0; B: 100 B at t=0.5. A alone to 0.5 (50 B left), then 50 B/s each:
    # A done at 1.5; B has 50 B left at 1.5, alone at 100 B/s -> done at 2.0. Not FIFO (FIFO: A 1.0, B 2.0).
    done, link = _run_transfers(100.0, 0.0, [(0.0, 100.0), (0.5, 100.0)])
    assert done[0] == pytest.approx(1.5, rel=1e-12)
    assert done[1] == pytest.approx(2.0, rel=1e-12)
    assert link.busy_s == pytest.approx(2.0, rel=1e-12)


def test_latency_is_not_shared():
    done, _ = _run_transfers(100.0, 1.0, [(0.0, 100.0), (0.0, 100.0)])
    assert done == [pytest.approx(3.0, rel=1e-12)] * 2  # 1 s latency + 200 B at 100 B/s


def test_transfers_overlap_with_compute():
    h = MemoryHierarchy.from_system(load_system("sn40l-node"))
    env = simpy.Environment()
    mem = SimMemory(env, h)
    nbytes = 1e9
    t_copy = h.transfer_time_s(nbytes, "ddr", "hbm")
    compute_s = 0.5 * t_copy

    def main():
        yield env.all_of([mem.transfer(nbytes, "ddr", "hbm"), env.timeout(compute_s)])

    env.process(main())
    env.run()
    assert env.now == pytest.approx(max(t_copy, compute_s), rel=1e-12)
    assert mem.bytes_by_path == {"ddr->hbm": nbytes}


def test_ddr_reads_share_the_ddr_port_but_not_the_hbm_port():
    h = MemoryHierarchy.from_system(load_system("sn40l-node"))
    assert h.channel("ddr", "hbm").name == h.channel("ddr", "sram").name == "ddr-port"
    assert h.channel("hbm", "sram").name == "hbm-port"
    assert h.channel("host", "hbm").name == "host_link"
    env = simpy.Environment()
    mem = SimMemory(env, h)
    a = mem.transfer(1e9, "ddr", "hbm")
    b = mem.transfer(1e9, "ddr", "sram")
    env.run()
    bw = h.tier("ddr").bandwidth_bytes_per_s
    assert a.value is None and b.processed
    assert env.now == pytest.approx(2e9 / bw + h.channel("ddr", "sram").latency_s, rel=1e-9)


def test_spec_tiers_and_channels_follow_the_spec_numbers():
    sn = MemoryHierarchy.from_system(load_system("sn40l-node"))
    assert [t for t in sn.tiers] == ["sram", "hbm", "ddr", "host"]
    assert sn.tier("hbm").bandwidth_bytes_per_s == 1.6e12  # HC2024: 25.6 TB/s / 16 sockets
    assert sn.tier("ddr").bandwidth_bytes_per_s == 100e9  # HC2024: 1600 GB/s / 16 sockets
    assert sn.tier("ddr").capacity_bytes == 1.5 * 2**40
    h100 = MemoryHierarchy.from_system(load_system("dgx-h100"))
    ch = h100.channel("host", "hbm")
    assert ch.bandwidth_bytes_per_s == 64e9
    assert h100.transfer_time_s(64e9, "host", "hbm") == 64e9 / 64e9 + ch.latency_s
    for name in ("dgx-a100", "dgx-h200", "sn40l-node"):
        MemoryHierarchy.from_system(load_system(name))


def test_zero_bandwidth_tier_is_rejected():
    bad = MemoryTier(name="ddr", capacity_bytes=1e9, bandwidth_bytes_per_s=0.0, latency_s=0.0)
    with pytest.raises(ValueError, match="ddr.*bandwidth must be > 0"):
        MemoryHierarchy(tiers={"ddr": bad})
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        SharedLink(simpy.Environment(), "pcie", 0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        transfer_time_s(1.0, 0.0, 0.0)


def test_zero_bandwidth_in_a_spec_file_is_rejected(tmp_path):
    from hwmodels.specs import SPEC_DIR
    text = (SPEC_DIR / "sn40l.toml").read_text().replace('value = "100 GB/s"', 'value = "0 GB/s"')
    dev = tmp_path / "sn40l.toml"
    dev.write_text(text)
    node = (SPEC_DIR / "sn40l-node.toml").read_text().replace('device = "sn40l"', f'device = "{dev}"')
    path = tmp_path / "node.toml"
    path.write_text(node)
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s.*must be > 0"):
        load_system(path)


def test_larger_than_every_tier_is_a_clear_error():
    h = MemoryHierarchy.from_system(load_system("dgx-h100"))
    with pytest.raises(ValueError, match="larger than every memory tier.*largest: host"):
        h.check_fits(3e12, "model 'huge'")
    with pytest.raises(ValueError, match="unknown memory tier 'l3'"):
        h.channel("l3", "hbm")
