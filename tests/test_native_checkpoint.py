"""Native (DCP + manifest) checkpoints: round trips with optimizer state, resharding between layouts on
real gloo ranks, the `latest` pointer under SIGKILL, refused manifests and refused pickles."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import random
import signal
import time

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from mixtral.checkpoint import native
from mixtral.checkpoint.native import (
    LazyTensor,
    load_native,
    published,
    read_boxes,
    save_native,
    save_native_step,
    whole,
)
from mixtral.config import MoEConfig
from mixtral.errors import MixtralError
from mixtral.model import Mixtral

from conftest import model_loss, small_config
from dist_utils import run_ranks


def trained(config, steps: int = 1) -> tuple[Mixtral, torch.optim.AdamW]:
    """A model and an AdamW that has taken steps (so the optimizer has state to save)."""
    model = Mixtral(config)
    model.init_weights(0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        tokens = torch.randint(0, config.vocab_size, (2, 8))
        model_loss(model, tokens, tokens.roll(-1, 1)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_round_trip_model_and_optimizer(tmp_path):
    config = small_config()
    model, opt = trained(config)
    path = save_native(
        tmp_path / "ck",
        model.state_dict(),
        get_optimizer_state_dict(model, opt),
        config=config,
        step=7,
        layout={"tp": 2, "pp": 1, "ep": 1},
        manifest_extra={"note": "x"},
    )
    manifest = json.loads((path / native.MANIFEST).read_text())
    assert manifest["format_version"] == native.FORMAT_VERSION and manifest["step"] == 7
    assert manifest["layout"] == {"tp": 2, "pp": 1, "ep": 1} and manifest["dtype"] == "float32"
    assert manifest["model_config"] == config.to_hf_dict() and manifest["extra"] == {"note": "x"}
    assert not any(p.name.startswith(".") and p.name != ".metadata" for p in tmp_path.rglob("*"))

    fresh = Mixtral(config)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert load_native(path, fresh, fresh_opt).step == 7
    assert_same_state(model.state_dict(), fresh.state_dict())
    assert_same_state(opt.state_dict(), fresh_opt.state_dict())
    tokens = torch.randint(0, config.vocab_size, (1, 9))
    assert torch.equal(model(tokens).logits, fresh(tokens).logits)


def test_lazy_boxes_and_resharded_reads(tmp_path):
    """A tensor written in boxes (as conversions write) reads back through any other box."""
    full = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
    boxes = [((i, j, 0), (1, 3, 5)) for i in range(4) for j in (0, 3)]
    made = []
    lazy = LazyTensor(
        (4, 6, 5),
        torch.bfloat16,
        boxes,
        lambda box: made.append(box) or full[box[0][0] : box[0][0] + 1, box[0][1] : box[0][1] + 3],
    )
    save_native(tmp_path / "ck", {"x": lazy}, config=small_config(), file_per_item=True)
    assert sorted(made) == sorted(boxes)
    got = read_boxes(tmp_path / "ck", {"model.x": [((1, 2, 1), (3, 3, 3)), whole((4, 6, 5))]})["model.x"]
    assert got[0].dtype == torch.bfloat16
    assert torch.equal(got[0], full[1:4, 2:5, 1:4].bfloat16()) and torch.equal(got[1], full.bfloat16())


def test_latest_pointer_and_pruning(tmp_path):
    config = small_config()
    model, _ = trained(config)
    for step in (1, 2, 3):
        save_native_step(tmp_path, step, model.state_dict(), config=config, keep_last=2)
    assert published(tmp_path) == (tmp_path / "step_00000003").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    fresh = Mixtral(config)
    assert load_native(tmp_path, fresh).step == 3
    assert_same_state(model.state_dict(), fresh.state_dict())


def test_pipeline_stage_loads_only_its_layers(tmp_path):
    """A pipeline stage keeps global layer names (layers.1) and loads just those; other stages' tensors are
    not errors."""
    config = small_config()
    model, _ = trained(config, steps=0)
    save_native(tmp_path / "ck", model.state_dict(), config=config)
    stage = Mixtral(config)
    stage.layers = torch.nn.ModuleDict({"1": stage.layers[1]})
    stage.lm_head = None
    load_native(tmp_path / "ck", stage)
    assert_same_state(stage.layers["1"].state_dict(), model.layers[1].state_dict())


def test_routing_buffers(tmp_path):
    """A checkpoint without routing state (HF conversion) loads into a model with expert bias (kept at zero);
    one with expert bias does not load silently into a model without it."""
    config = small_config()
    save_native(tmp_path / "plain", Mixtral(config).state_dict(), config=config)
    biased = Mixtral(config, moe=MoEConfig(expert_bias=True))
    load_native(tmp_path / "plain", biased)
    assert torch.equal(biased.layers[0].mlp.expert_bias, torch.zeros(config.num_local_experts))
    save_native(tmp_path / "biased", biased.state_dict(), config=config)
    with pytest.raises(MixtralError, match=r"holds 'layers.0.mlp.expert_bias', which the model lacks.*moe.expert_bias"):
        load_native(tmp_path / "biased", Mixtral(config))


def _save_forever(root, config, start: int) -> None:
    """Child: save step after step (weights = step number) until killed."""
    model = Mixtral(config)
    step = start
    while True:
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float(step))
        save_native_step(root, step, model.state_dict(), config=config, keep_last=2)
        step += 1


def test_sigkill_during_saves_never_breaks_latest(tmp_path):
    """SIGKILL a saving process at random moments 24 times: `latest` always loads, and holds its step."""
    config = small_config(num_hidden_layers=1)
    ctx = mp.get_context("forkserver")  # children forked from a clean server: no parent threads to deadlock on
    ctx.set_forkserver_preload(["torch", "mixtral.checkpoint.native"])
    rng = random.Random(0)
    model = Mixtral(config)
    start, checked = 0, 0
    for _ in range(24):
        child = ctx.Process(target=_save_forever, args=(tmp_path, config, start), daemon=True)
        child.start()
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        if published(tmp_path) is not None:
            step = load_native(tmp_path, model).step
            assert all(torch.equal(p, torch.full_like(p, float(step))) for p in model.parameters()), step
            start, checked = step + 1, checked + 1
        hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert len(hidden) <= 2, hidden  # killed saves leave at most their own temporary behind
    print(f"24 kills; latest loaded after {checked} of them; {start} saves published in all")
    assert checked >= 20 and start >= 20  # the kills landed among many completed saves


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m.update(architecture="LlamaForCausalLM"), "architecture is 'LlamaForCausalLM'"),
        (lambda m: m["model_config"].update(model_type="llama"), "model_type is 'llama', not 'mixtral'"),
        (lambda m: m.update(format="something"), "not a native mixtral-run checkpoint manifest"),
    ],
)
def test_manifest_refused(tmp_path, change, message):
    config = small_config()
    path = save_native(tmp_path / "ck", Mixtral(config).state_dict(), config=config)
    data = json.loads((path / native.MANIFEST).read_text())
    change(data)
    (path / native.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(MixtralError, match=message) as err:
        load_native(path, Mixtral(config))
    assert str(path / native.MANIFEST) in str(err.value)


def test_mismatched_model_and_missing_optimizer(tmp_path):
    config = small_config()
    path = save_native(tmp_path / "ck", Mixtral(config).state_dict(), config=config)
    with pytest.raises(MixtralError, match=r"model config differs .*num_hidden_layers: checkpoint 2 vs model 3"):
        load_native(path, Mixtral(small_config(num_hidden_layers=3)))
    model = Mixtral(config)
    with pytest.raises(MixtralError, match="holds no optimizer state"):
        load_native(path, model, torch.optim.AdamW(model.parameters()))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_pickle_is_never_trusted(tmp_path, monkeypatch):
    config = small_config()
    path = save_native(tmp_path / "ck", Mixtral(config).state_dict(), config=config)
    (path / native.DCP_METADATA).write_bytes(pickle.dumps(_Exploit()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MixtralError, match=r"refers to 'posix.system'.*only DCP record types"):
        load_native(path, Mixtral(config))
    assert not (tmp_path / "pwned").exists()
    (path / native.DCP_METADATA).write_bytes(b"\x80\x04truncated")
    with pytest.raises(MixtralError, match="unreadable checkpoint metadata"):
        load_native(path, Mixtral(config))


def test_truncated_data_file(tmp_path):
    config = small_config()
    path = save_native(tmp_path / "ck", Mixtral(config).state_dict(), config=config)
    data = next(path.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(MixtralError, match="reading the checkpoint failed"):
        load_native(path, Mixtral(config))


# --- resharding on real gloo ranks -----------------------------------------------------------------

SHARDED_CONFIG = dict(num_local_experts=4, num_attention_heads=4, num_key_value_heads=2)


def _sharded_rank(source: str, target: str) -> dict:
    """TP2 attention (DTensor) and experts split over the 2 ranks (EP-style Shard(0)): load a single-process
    checkpoint, check this rank's shards, take one AdamW step with all-ones gradients, save everything."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from mixtral.parallel import apply_tensor_parallel

    config = small_config(**SHARDED_CONFIG)
    mesh = init_device_mesh("cpu", (2,))
    model = apply_tensor_parallel(Mixtral(config), mesh)
    for layer in model.layers:
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(layer.mlp.experts, name).detach()
            setattr(layer.mlp.experts, name, nn.Parameter(distribute_tensor(full, mesh, [Shard(0)])))
    load_native(source, model)
    reference = Mixtral(config)
    load_native(source, reference)
    rank = dist.get_rank()
    local_expert = model.layers[1].mlp.experts.gate_up_proj.to_local()
    assert torch.equal(local_expert, reference.layers[1].mlp.experts.gate_up_proj[2 * rank : 2 * rank + 2])
    local_q = model.layers[0].self_attn.q_proj.weight.to_local()
    assert torch.equal(local_q, reference.layers[0].self_attn.q_proj.weight.chunk(2)[rank])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    opt.step()
    save_native(
        target,
        model.state_dict(),
        get_optimizer_state_dict(model, opt),
        config=config,
        step=1,
        layout={"tp": 2, "pp": 1, "ep": 2},
    )
    return {}


def test_reshard_between_one_process_and_tp2_ep2(tmp_path):
    """Saved in one process, loaded into TP2 + 2-way expert sharding, stepped and saved there, loaded back in
    one process: model and optimizer state equal one process taking the same step."""
    config = small_config(**SHARDED_CONFIG)
    model, _ = trained(config, steps=0)
    save_native(tmp_path / "one", model.state_dict(), config=config)
    run_ranks(_sharded_rank, 2, str(tmp_path / "one"), str(tmp_path / "two"))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    opt.step()
    fresh = Mixtral(config)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    manifest = load_native(tmp_path / "two", fresh, fresh_opt)
    assert manifest.layout == {"tp": 2, "pp": 1, "ep": 2}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=name)
    expected, got = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for index in expected:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got[index][key], expected[index][key], rtol=0, atol=1e-7)
