"""One CPU process of a multi-process test: sharded load + forward, results to --out.

Started by tests/test_multihost.py (N processes on 127.0.0.1, gloo collectives). Each
process writes result_<process_id>.npz with the gathered logits of every mesh, the bytes
it read from the checkpoint per mesh, and per-parameter checks of its addressable shards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--batch", required=True, help="npz with the full global batch")
    ap.add_argument("--out", required=True)
    # without these three, the start-up comes from the environment (SLURM variables)
    ap.add_argument("--coordinator")
    ap.add_argument("--num_processes", type=int)
    ap.add_argument("--process_id", type=int)
    ap.add_argument("--cpu_devices", type=int, default=2)
    ap.add_argument("--meshes", default="1,2,2", help="';'-separated data,fsdp,tensor")
    args = ap.parse_args()

    from xft_jax import distributed

    spec = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                  platform="cpu", cpu_devices=args.cpu_devices, timeout_s=60)

    import jax
    import numpy as np
    from flax import nnx

    from xft_jax import sharding
    from xft_jax.models import hf_io, safetensors_reader
    from xft_jax.models.decoder import TokenInputs, forward

    assert jax.process_count() == spec.num_processes, (jax.process_count(), spec)
    assert jax.process_index() == spec.process_id, (jax.process_index(), spec)
    assert jax.local_device_count() == args.cpu_devices, jax.local_device_count()

    read_bytes = [0]   # bytes this process reads from the checkpoint
    cls = safetensors_reader.SafetensorsFile
    read_block = cls.read_block

    def counted(self, *a, **k):
        out = read_block(self, *a, **k)
        read_bytes[0] += out.nbytes
        return out

    cls.read_block = counted

    full = dict(np.load(args.batch))
    result = {"primary": np.array(distributed.is_primary()),
              "process_index": np.array(jax.process_index())}
    report = {"spec": spec.describe(), "meshes": {}}
    for mesh_arg in args.meshes.split(";"):
        d, f, t = (int(x) for x in mesh_arg.split(","))
        tag = f"{d}x{f}x{t}"
        mesh = sharding.create_mesh(d, f, t)
        read_bytes[0] = 0
        t0 = time.time()
        model = hf_io.load_pretrained(args.ckpt, mesh=mesh)
        load_s = time.time() - t0
        shard_ok = []
        for _, var in nnx.to_flat_state(nnx.state(model)):
            arr = var.get_value()
            spec_p = arr.sharding.spec
            n = 1
            for entry in spec_p:
                for ax in ((entry,) if isinstance(entry, str) else (entry or ())):
                    n *= mesh.shape[ax]
            for s in arr.addressable_shards:
                expect = arr.size // n
                shard_ok.append(int(s.data.size == expect and s.data.shape == tuple(
                    sl.indices(dim)[1] - sl.indices(dim)[0]
                    for sl, dim in zip(s.index, arr.shape))))
        rows = sharding.process_batch_slice(mesh, full["input_ids"].shape[0])
        local = {k: v[rows] for k, v in full.items()}
        batch = sharding.make_global_batch(mesh, local)
        params, cfg, opts = model.params(), model.config, model.forward_options()

        def fwd(p, b):
            with sharding.activation_sharding(mesh):
                inputs = TokenInputs(b["input_ids"], positions=b["positions"],
                                     segment_ids=b["segment_ids"])
                return forward(p, cfg, inputs, opts=opts)["logits"]

        logits = jax.jit(fwd)(params, batch)
        result[f"logits_{tag}"] = sharding.to_host(logits)
        result[f"read_bytes_{tag}"] = np.array(read_bytes[0])
        result[f"shard_ok_{tag}"] = np.array(shard_ok)
        result[f"rows_{tag}"] = np.array([rows.start, rows.stop])
        report["meshes"][tag] = {"read_bytes": read_bytes[0], "load_s": round(load_s, 3),
                                 "rows": [rows.start, rows.stop],
                                 "describe": sharding.describe(mesh)}
    distributed.sync("results")
    os.makedirs(args.out, exist_ok=True)
    pid = jax.process_index()
    tmp = os.path.join(args.out, f".tmp_result_{pid}.npz")
    np.savez(tmp, **result)
    os.replace(tmp, os.path.join(args.out, f"result_{pid}.npz"))
    if distributed.is_primary():
        with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    distributed.sync("written")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
