"""Loading packed weights never materialises float projections: peak anonymous memory stays near packed size.

An 8-layer model (hidden 512, FFN 2048: 32 M projection parameters, 128 MB as fp32, 8 MB packed) is saved
in both forms; a fresh subprocess loads (a) the packed checkpoint and (b) the master checkpoint with
``packed=True`` while a thread samples ``RssAnon`` (file-backed pages of the memory-mapped checkpoint are
not the model's memory and are excluded). Either load may use at most a quarter of the float size.

glibc keeps freed blocks of a few MB in its heap once its dynamic mmap threshold has grown, which would
show up as "growth" although no tensor is alive; the subprocess pins ``MALLOC_MMAP_THRESHOLD_`` so that
RssAnon tracks live allocations. (In an ordinary process that retention can make RSS after a master→packed
load look larger than the packed model; ``malloc_trim`` or the same variable returns it.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from bitnet_torch.models import BitNetConfig, BitNetForCausalLM

_MEASURE = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch
    from bitnet_torch.models import BitNetForCausalLM

    def rss_anon():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    def peak_growth(load):
        base, peak, done = rss_anon(), [0], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_anon())
                time.sleep(0.002)
        sampler = threading.Thread(target=sample)
        sampler.start()
        model = load()
        done.set()
        sampler.join()
        assert model.is_packed
        return max(peak[0], rss_anon()) - base

    results = {
        "packed": peak_growth(lambda: BitNetForCausalLM.from_pretrained(sys.argv[1])),
        "master_packed_on_load": peak_growth(lambda: BitNetForCausalLM.from_pretrained(sys.argv[2], packed=True)),
    }
    print(json.dumps(results))
    """
)


def test_packed_loading_peak_memory_stays_near_packed_size(tmp_path):
    config = BitNetConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2)
    model = BitNetForCausalLM(config)
    float_bytes = sum(m.weight.numel() * 4 for _, m in model.model.projections())
    model.save_pretrained(tmp_path / "master", packed=False)
    model.save_pretrained(tmp_path / "packed", packed=True)
    del model
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "packed"), str(tmp_path / "master")],
                            capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    limit = float_bytes // 4
    for route, grown in growth.items():
        assert grown < limit, (
            f"{route}: loading grew anonymous memory by {grown / 2**20:.0f} MiB; float projections are "
            f"{float_bytes / 2**20:.0f} MiB, packed {float_bytes / 16 / 2**20:.0f} MiB"
        )
    assert torch.get_default_dtype() == torch.float32
