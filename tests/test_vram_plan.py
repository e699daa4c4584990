"""The VRAM plan (resisod/vram_plan.py), GGUF layer fitting (engines/gguf_fit.py) and the
inherited CUDA_VISIBLE_DEVICES (devices.py): pure functions, no GPU needed."""
import math
import os
import struct
import subprocess
import sys

import pytest

from resisod import devices, vram_plan
from resisod.engines import gguf_fit
from resisod.vram_plan import PlanError

GB = 1024
ALLOC = {"llm": 70, "image": 30}


def gpu(total_mb, index=0):
    return {"index": index, "total_mb": total_mb}


def doms(llm_workers=1, image_workers=1, llm_engine="llama_cpp", **extra):
    out = {"llm": {"device": "auto", "kind": "llm", "workers": llm_workers,
                   "engine": llm_engine},
           "image": {"device": "auto", "kind": "image", "workers": image_workers,
                     "engine": "diffusers"},
           "tts": {"device": "cpu", "kind": "tts", "workers": 2, "engine": "piper"}}
    out.update(extra)
    return out


def assert_fits(p):
    for gp in p.gpus.values():
        budgets = sum(b.budget_mb for b in p.workers.values() if b.gpu == gp.index)
        assert budgets == gp.budgets_mb
        assert budgets + gp.context_mb + gp.margin_mb <= gp.total_mb
        assert gp.free_mb >= 0
    for b in p.workers.values():
        assert b.fraction == pytest.approx(b.budget_mb / p.gpus[b.gpu].total_mb)
        assert b.budget_mb >= vram_plan.FLOOR_MB


# --- the plan -------------------------------------------------------------------------------

@pytest.mark.parametrize("total", [8 * GB, 24 * GB, 80 * GB])
@pytest.mark.parametrize("llm_workers,image_workers", [(1, 1), (1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("llm_engine", ["llama_cpp", "transformers"])
def test_plans_never_exceed_the_card(total, llm_workers, image_workers, llm_engine):
    p = vram_plan.plan([gpu(total)], doms(llm_workers, image_workers, llm_engine), ALLOC)
    assert_fits(p)
    gp = p.gpus[0]
    assert gp.processes == llm_workers + image_workers
    assert gp.context_mb == gp.processes * vram_plan.CONTEXT_MB
    assert gp.margin_mb == math.ceil(max(512, total * 0.05))
    usable = total - gp.context_mb - gp.margin_mb
    llm, image = p.budget("llm", 0), p.budget("image", 0)
    # two workers halve each one's budget: a domain's share never doubles
    assert llm.budget_mb == int(0.7 * usable / llm_workers)
    assert image.budget_mb == int(0.3 * usable / image_workers)
    assert p.budget("llm", llm_workers) is None
    assert llm.cap == ("layers" if llm_engine == "llama_cpp" else "fraction")
    assert image.cap == "fraction"
    assert p.budget("tts", 0) is None          # on the CPU: nothing
    assert vram_plan.describe(p)[0].startswith(f"cuda:0 {total} MB")


def test_the_numbers_on_an_8_gb_card():
    p = vram_plan.plan([gpu(8192)], doms(1, 1), ALLOC)
    # 8192 - 2 x 700 - 512 = 6280 usable: 70 % and 30 %
    assert p.budget("llm", 0).budget_mb == 4396
    assert p.budget("image", 0).budget_mb == 1884
    assert p.budget("image", 0).fraction == pytest.approx(1884 / 8192)
    assert p.gpus[0].free_mb == 0


def test_cpu_domains_and_machines_without_gpu_take_nothing():
    assert vram_plan.plan([], doms(), ALLOC).workers == {}
    cpu_only = {n: {**d, "device": "cpu"} for n, d in doms().items()}
    assert vram_plan.plan([gpu(8192)], cpu_only, ALLOC).gpus == {}
    # a domain on explicit cuda with no probe (no NVML): the worker falls back as before
    assert vram_plan.plan([], doms(llm={"device": "cuda:0", "kind": "llm", "workers": 1}),
                          ALLOC).workers == {}
    remote = doms(image={"device": "auto", "kind": "image", "workers": 0})
    assert vram_plan.plan([gpu(8192)], remote, ALLOC).gpus[0].processes == 1


def test_domains_on_two_gpus_are_planned_apart():
    d = doms(image={"device": "cuda:1", "kind": "image", "workers": 1})
    p = vram_plan.plan([gpu(24 * GB, 0), gpu(8 * GB, 1)], d, ALLOC)
    assert_fits(p)
    assert p.budget("llm", 0).gpu == 0 and p.budget("image", 0).gpu == 1
    assert p.gpus[0].processes == p.gpus[1].processes == 1
    with pytest.raises(PlanError, match="no such GPU.*cuda:0, cuda:1"):
        vram_plan.plan([gpu(8192, 0), gpu(8192, 1)],
                       doms(image={"device": "cuda:2", "kind": "image", "workers": 1}), ALLOC)


def test_a_kind_without_allocation_needs_an_explicit_share_beside_others():
    tts_gpu = {"device": "cuda:0", "kind": "tts", "workers": 1}
    with pytest.raises(PlanError, match=r"tts-gpu \(kind 'tts'\) has no gpu_allocation"):
        vram_plan.plan([gpu(24 * GB)], doms(**{"tts-gpu": tts_gpu}), ALLOC)
    # alone on its card it takes all of it, as before the plan
    p = vram_plan.plan([gpu(8192)], {"tts-gpu": tts_gpu}, ALLOC)
    assert p.budget("tts-gpu", 0).budget_mb == 8192 - 700 - 512
    # with an explicit share it fits beside the others if the shares leave room
    alloc = {"llm": 60, "image": 30}
    p = vram_plan.plan([gpu(24 * GB)], doms(**{"tts-gpu": {**tts_gpu, "share_pct": 10}}), alloc)
    assert_fits(p)
    assert p.gpus[0].shares_pct == {"llm": 60, "image": 30, "tts-gpu": 10}


def test_a_kinds_allocation_is_split_among_its_domains_on_one_gpu():
    d = doms(chat={"device": "auto", "kind": "llm", "workers": 1})
    p = vram_plan.plan([gpu(24 * GB)], d, ALLOC)
    assert p.gpus[0].shares_pct == {"llm": 35, "chat": 35, "image": 30}
    assert_fits(p)


def test_impossible_plans_are_refused_with_their_numbers():
    # allocations over 100 %
    with pytest.raises(PlanError) as e:
        vram_plan.plan([gpu(24 * GB)], doms(), {"llm": 80, "image": 30})
    msg = str(e.value)
    for part in ("24576 MB", "2 worker process(es) x 700 MB", "1229 MB margin",
                 "llm asks 80 %", "image asks 30 %", "110 %, over 100 %"):
        assert part in msg, (part, msg)
    # budgets under the floor: a small card, many workers
    with pytest.raises(PlanError) as e:
        vram_plan.plan([gpu(4 * GB)], doms(1, 2), ALLOC)
    msg = str(e.value)
    for part in ("4096 MB", "3 worker process(es)", "leave 1484 MB", "image (223 MB each)",
                 "256 MB floor"):
        assert part in msg, (part, msg)
    # reserves alone over the card
    with pytest.raises(PlanError, match="reserves alone exceed the card"):
        vram_plan.plan([gpu(2 * GB)], doms(2, 2), ALLOC)
    # a share of 0, by kind or explicit
    with pytest.raises(PlanError, match=r"0 % of the card \(gpu_allocation.image = 0\)"):
        vram_plan.plan([gpu(24 * GB)], doms(), {"llm": 70, "image": 0})
    with pytest.raises(PlanError, match="image has a share of 0 %"):
        vram_plan.plan([gpu(24 * GB)],
                       doms(image={"device": "auto", "kind": "image", "workers": 1,
                                   "share_pct": 0}), ALLOC)


def test_reserves_and_floor_are_configurable():
    p = vram_plan.plan([gpu(8192)], doms(), ALLOC, context_mb=500, margin_pct=10,
                       margin_min_mb=0)
    assert p.gpus[0].context_mb == 1000 and p.gpus[0].margin_mb == 820
    assert_fits(p)
    with pytest.raises(PlanError, match="under the 3000 MB floor"):
        vram_plan.plan([gpu(8192)], doms(), ALLOC, floor_mb=3000)


# --- GGUF layers ----------------------------------------------------------------------------

def test_layers_that_fit():
    layers = [100] * 10
    assert gguf_fit.layers_that_fit(layers, 50, 10, 50 + 10 * 110) == 10
    assert gguf_fit.layers_that_fit(layers, 50, 10, 50 + 10 * 110 - 1) == 9
    assert gguf_fit.layers_that_fit(layers, 50, 10, 50 + 3 * 110) == 3
    assert gguf_fit.layers_that_fit(layers, 50, 10, 49) == 0
    assert gguf_fit.layers_that_fit(layers, 0, 0, 0) == 0
    # the last blocks are offloaded first (llama.cpp's order)
    assert gguf_fit.layers_that_fit([1000, 10, 10], 0, 0, 25) == 2


@pytest.fixture(scope="module")
def smollm():
    from resisod import builtin
    path = builtin.llm_path("builtin:smollm2-135m-instruct")
    if not path or not os.path.exists(path):
        pytest.skip("the built-in GGUF model is not installed")
    return path


def test_gguf_layer_sizes_of_the_builtin_model(smollm):
    layers, other, n_layer, kv_token = gguf_fit.gguf_layer_sizes(smollm)
    assert n_layer == len(layers) == 30
    size = os.path.getsize(smollm)
    # the tensors are the file less its header (a few MB at most)
    assert size - 8 * 2**20 < sum(layers) + other <= size
    assert len(set(layers)) == 1 and layers[0] > 0
    # SmolLM2-135M: 3 KV heads of 576 / 9 = 64, K and V in f16
    assert kv_token == 3 * (64 + 64) * 2
    kv_layer = kv_token * 2048 * 4
    everything = sum(layers) + other + n_layer * kv_layer
    assert gguf_fit.layers_that_fit(layers, other, kv_layer, everything) == n_layer
    assert gguf_fit.layers_that_fit(layers, other, kv_layer, size + n_layer * kv_layer) == 30
    few = gguf_fit.layers_that_fit(layers, other, kv_layer, other + 5 * (layers[0] + kv_layer))
    assert few == 5
    assert gguf_fit.layers_that_fit(layers, other, kv_layer, 0) == 0
    # the whole offload decision, compute buffer included
    assert gguf_fit.offload_layers(smollm, 2**30, 2048, 16) == -1
    assert 0 < gguf_fit.offload_layers(smollm, 220 * 2**20, 2048, 16) < n_layer
    assert gguf_fit.offload_layers(smollm, 0, 2048, 16) == 0


def test_gguf_sizes_agree_with_the_gguf_package(smollm):
    gguf = pytest.importorskip("gguf")
    _, sizes, _ = gguf_fit.read_header(smollm)
    theirs = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(smollm).tensors}
    assert sizes.keys() == theirs.keys()
    assert all(0 <= sizes[n] - theirs[n] < 32 for n in theirs)  # padding to the alignment


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(gguf_fit.GgufError, match="not a GGUF file"):
        gguf_fit.read_header(str(bad))
    bad.write_bytes(b"GGUF" + struct.pack("<I", 1) + b"\0" * 64)
    with pytest.raises(gguf_fit.GgufError, match="version 1"):
        gguf_fit.read_header(str(bad))


# --- inherited CUDA_VISIBLE_DEVICES ---------------------------------------------------------

def env(device, inherited):
    return devices.visible_devices_env(device, inherited)


def test_visible_devices_without_an_inherited_list(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.visible_devices_env("cuda:1") == {"CUDA_VISIBLE_DEVICES": "1",
                                                     "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert env("cpu", None)["CUDA_VISIBLE_DEVICES"] == ""
    assert env("auto", None)["CUDA_VISIBLE_DEVICES"] == "0"


def test_visible_devices_map_through_the_inherited_list(monkeypatch):
    assert env("cuda:1", "3,5")["CUDA_VISIBLE_DEVICES"] == "5"
    assert env("cuda:0", "3,5")["CUDA_VISIBLE_DEVICES"] == "3"
    assert env("cuda", "3,5")["CUDA_VISIBLE_DEVICES"] == "3"
    assert env("cpu", "3,5")["CUDA_VISIBLE_DEVICES"] == ""
    uuids = "GPU-8f1e2a3b-0000-1111-2222-333344445555, GPU-aaaabbbb-0000-1111-2222-333344445555"
    assert env("cuda:1", uuids)["CUDA_VISIBLE_DEVICES"] == \
        "GPU-aaaabbbb-0000-1111-2222-333344445555"
    mig = "MIG-4b5c6d7e-1234-5678-9abc-def012345678"
    assert env("auto", mig) == {"CUDA_VISIBLE_DEVICES": mig, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    # the default reads the daemon's own environment
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,7")
    assert devices.visible_devices_env("cuda:1")["CUDA_VISIBLE_DEVICES"] == "7"


def test_an_index_beyond_the_inherited_list_is_an_error():
    with pytest.raises(devices.DeviceError, match=r"GPU 2 .*CUDA_VISIBLE_DEVICES='3,5' "
                                                  r"\(2 GPUs: cuda:0..cuda:1\)"):
        env("cuda:2", "3,5")
    errors = devices.visible_device_errors(
        {"llm": {"device": "cuda:0"}, "image": {"device": "cuda:1"}, "tts": {"device": "cpu"}},
        "4")
    assert errors == [errors[0]] and errors[0].startswith("domains.image.device: ")


def test_an_empty_inherited_list_means_no_gpu():
    for device in ("auto", "cuda", "cuda:0", "cuda:3", "cpu"):
        assert env(device, "")["CUDA_VISIBLE_DEVICES"] == ""
    # CUDA stops at the first malformed entry: "-1" hides every GPU, "0,-1,1" keeps GPU 0
    assert env("cuda:0", "-1")["CUDA_VISIBLE_DEVICES"] == ""
    assert devices.inherited_visible("0,-1,1") == ["0"]
    assert devices.inherited_visible(" ") == []


def test_visible_gpus_follow_the_inherited_list():
    probed = [{"index": i, "uuid": f"GPU-{i}", "total_mb": 1000.0 * (i + 1)} for i in range(4)]
    assert [g["physical"] for g in devices.visible_gpus(probed, None)] == [0, 1, 2, 3]
    seen = devices.visible_gpus(probed, "3,1")
    assert [(g["index"], g["physical"], g["total_mb"]) for g in seen] == \
        [(0, 3, 4000.0), (1, 1, 2000.0)]
    assert [g["physical"] for g in devices.visible_gpus(probed, "GPU-2")] == [2]
    assert devices.visible_gpus(probed, "") == []
    # a plan on those: cuda:1 is physical GPU 1's 2000 MB
    p = vram_plan.plan(seen, {"img": {"device": "cuda:1", "kind": "image", "workers": 1}},
                       ALLOC, margin_min_mb=0, context_mb=100, floor_mb=1)
    assert p.gpus[1].total_mb == 2000.0


def test_the_plan_modules_import_no_model_library():
    code = ("import sys, resisod.vram_plan, resisod.devices, resisod.engines.gguf_fit; "
            "print(sorted({'torch', 'llama_cpp', 'gguf', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_llama_cpp_offloads_what_its_budget_holds():
    """The engine's layer choice from its VRAM budget, without a GPU: the decision only."""
    from resisod import builtin
    from resisod.engines.base import EngineContext, EngineUnavailable
    from resisod.engines.llama_cpp import LlamaCppEngine
    path = builtin.llm_path("builtin:smollm2-135m-instruct")

    def layers(budget_mb, asked):
        ctx = EngineContext("llm", "/tmp", "/tmp", "cuda", 1, 1.0, gpu_budget_mb=budget_mb)
        engine = LlamaCppEngine({"model": "builtin:smollm2-135m-instruct",
                                 "context_size": 2048, "gpu_layers": asked}, ctx)
        engine.n_ctx, engine.capacity = 2048, 4
        return engine._gpu_layers(path)

    assert layers(None, -1) == -1          # no plan: everything, as configured
    assert layers(4000, -1) == -1          # the whole model and its KV fit
    partial = layers(330, -1)
    assert 0 < partial < 30                # some blocks; the KV of 4 x 2048 tokens counts
    assert layers(330, partial) == partial
    with pytest.raises(EngineUnavailable, match=r"gpu_layers = 30 .* budget of 330 MB"):
        layers(330, 30)
