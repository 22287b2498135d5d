"""The generation engine against transformers' generate, and `mixtral-run generate` end to end."""

from __future__ import annotations

import io
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mixtral.backend import get_backend
from mixtral.checkpoint.hf import load_hf_model
from mixtral.cli import main
from mixtral.config import ModelConfig
from mixtral.data.tokenizer import Tokenizer
from mixtral.errors import MixtralError
from mixtral.kernels import packed_experts
from mixtral.model import Mixtral
from mixtral.serve.engine import Generator, TextStream

from conftest import single_thread, small_config

NEW_TOKENS = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


def hf_pair(config: ModelConfig) -> tuple[transformers.MixtralForCausalLM, Mixtral]:
    """A random transformers Mixtral (weights std 0.2: peaked logits, no near-ties) and ours with its weights."""
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**config.to_hf_dict())).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.2)
    ours = Mixtral(config, get_backend("cpu"))
    hf_state = hf.state_dict()
    ours.load_state_dict({k: hf_state[k if k == "lm_head.weight" else "model." + k] for k in ours.state_dict()})
    return hf, ours


def hf_greedy(hf: transformers.MixtralForCausalLM, prompt: list[int]) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 8, "tie_word_embeddings": True}])
@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["dynamic", "fixed_shapes"])
def test_greedy_equals_transformers_generate(overrides, fixed_shapes):
    """Also with the fixed-shape decoding XLA and Gaudi get: prompts padded to 16, the whole cache attended."""
    hf, ours = hf_pair(small_config(**overrides))
    prompts = [torch.randint(3, 101, (n,)).tolist() for n in (5, 12)]
    expected = [hf_greedy(hf, p) for p in prompts]
    generator = Generator(ours, fixed_shapes=fixed_shapes)
    assert generator.generate(prompts[:1], NEW_TOKENS) == expected[:1]
    # one batch of different lengths (left-padded) gives what each prompt gives alone
    assert generator.generate(prompts, NEW_TOKENS) == expected


def test_fixed_shapes_decode_compiles_once():
    """Fixed-shape decoding: every decode step, at every position, reuses one graph (dynamic=False), and prompts of
    5 and 9 tokens share one prefill graph; the backends that compile per shape pick it from their capabilities."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    _, model = hf_pair(small_config())
    model.compile(backend=counting_backend, dynamic=False)
    generator = Generator(model, fixed_shapes=True)
    generator.generate([list(range(3, 8))], 4)
    compiled = len(graphs)
    assert generator.generate([list(range(3, 12))], 12)
    assert len(graphs) == compiled == 2  # one prefill graph, one decode graph
    assert Generator(model).fixed_shapes is False
    assert Generator(model, device="xla").fixed_shapes is Generator(model, device="hpu").fixed_shapes is True


def test_seeds_streaming_and_eos():
    _, model = hf_pair(small_config())
    generator = Generator(model)
    prompts = [[1, 5, 9], [1, 7]]
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.95)
    first = generator.generate(prompts, 30, seed=3, **kwargs)
    assert first == generator.generate(prompts, 30, seed=3, **kwargs)
    assert first != generator.generate(prompts, 30, seed=4, **kwargs)
    greedy = generator.generate(prompts, 30)
    assert generator.generate(prompts, 30, temperature=1.0, top_k=1, seed=5) == greedy

    streamed: list[tuple[int, int]] = []
    generator.generate(prompts, 30, on_token=lambda row, token: streamed.append((row, token)))
    assert [[t for r, t in streamed if r == row] for row in range(2)] == greedy

    generator.eos_id = greedy[0][4]  # row 0 stops at its first occurrence, EOS included
    stopped = generator.generate(prompts, 30)
    assert stopped[0] == greedy[0][: greedy[0].index(generator.eos_id) + 1]
    if generator.eos_id not in greedy[1]:
        assert stopped[1] == greedy[1]
    assert generator.generate(prompts, 30, stop_at_eos=False) == greedy


def test_engine_errors_name_the_numbers():
    _, model = hf_pair(small_config(max_position_embeddings=40))
    generator = Generator(model)
    with pytest.raises(MixtralError, match="empty prompt"):
        generator.generate([[1, 2], []], 4)
    with pytest.raises(
        MixtralError, match="prompt of 10 tokens plus 31 new tokens exceeds .* 40; lower max tokens to at most 30"
    ):
        generator.generate([list(range(1, 11))], 31)


def test_text_stream_pieces_join_to_the_decoding():
    tokenizer = Tokenizer()
    text = "Grüße,  naïve café ☕ 🎉  end"
    ids = tokenizer.encode(text, bos=False)
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


# ---- the CLI, on a tiny model saved by transformers (HF layout) with Mixtral's tokenizer vocabulary ----

CLI_CONFIG = dict(
    vocab_size=32000, hidden_size=32, intermediate_size=24, num_attention_heads=4, max_position_embeddings=48
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf, _ = hf_pair(small_config(**CLI_CONFIG))
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """(Generator, tokenizer) loaded directly: what the CLI must reproduce."""
    tokenizer = Tokenizer()
    return Generator(load_hf_model(model_dir, "cpu"), tokenizer), tokenizer


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prompt_stream_and_file(model_dir, reference, capsys, tmp_path):
    generator, tokenizer = reference
    expected = tokenizer.decode(generator.generate([tokenizer.encode("The capital of France")], 12)[0])
    assert cli(capsys, "--model", str(model_dir), "--prompt", "The capital of France", "--max-tokens", "12") == (
        0,
        expected + "\n",
        "",
    )
    assert cli(
        capsys, "--model", str(model_dir), "--prompt", "The capital of France", "--max-tokens", "12", "--stream"
    )[:2] == (0, expected + "\n")

    sampled = [
        cli(
            capsys,
            "--model",
            str(model_dir),
            "--prompt",
            "Once",
            "--max-tokens",
            "10",
            "--temperature",
            "0.9",
            "--top-p",
            "0.9",
            "--top-k",
            "40",
            "--seed",
            str(seed),
        )[1]
        for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]

    prompts = ["Hello there", "A much longer prompt than the first one", "x"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    code, out, err = cli(
        capsys,
        "--model",
        str(model_dir),
        "--prompts-file",
        str(tmp_path / "prompts.txt"),
        "--max-tokens",
        "8",
        "--batch-size",
        "2",
    )
    assert code == 0 and "3/3" in err  # the progress bar
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for row in rows:
        ids = generator.generate([tokenizer.encode(row["prompt"])], 8)[0]
        assert row["completion"] == tokenizer.decode(ids)


def test_cli_compile_gives_the_eager_tokens(model_dir, reference, capsys):
    """--compile (inductor, the whole model, dynamic shapes; compiled before the first prompt) completes as
    eager, fp32."""
    generator, tokenizer = reference
    expected = tokenizer.decode(generator.generate([tokenizer.encode("The capital of France")], 12)[0])
    code, out, err = cli(
        capsys, "--model", str(model_dir), "--prompt", "The capital of France", "--max-tokens", "12", "--compile"
    )
    assert (code, out) == (0, expected + "\n") and "compiling the model for generation" in err


def test_compiled_batched_decoding_gives_the_eager_tokens():
    """The cpu backend's generation graphs (a batch's decode steps frozen and multiplied by inductor's GEMM
    template, the experts on packed weights) complete a padded batch as eager does, fp32; a reallocated KV cache
    (another batch came in between) reuses the graphs: the frozen graph writes the cache, so it is an input, not a
    constant."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = Mixtral(small_config(), get_backend("cpu"))
    model.init_weights()
    model.eval()
    prompts = [torch.randint(3, 101, (n,)).tolist() for n in (5, 12, 7)]
    expected = Generator(model).generate(prompts, 8)
    torch._dynamo.reset()
    get_backend("cpu").compile(model, dynamic=True, inference=True)
    assert all(layer.mlp.experts.down_proj.data_ptr() in packed_experts.PACKED.frozen for layer in model.layers)
    generator = Generator(model)
    assert generator.generate(prompts, 8) == expected
    graphs, cache = counters["stats"]["unique_graphs"], model.layers[0].self_attn.kv_cache.k
    with torch.inference_mode():  # as Generator allocates it
        model.setup_caches(cache.shape[0], cache.shape[2])
    assert generator.generate(prompts, 8) == expected
    assert counters["stats"]["unique_graphs"] == graphs and model.layers[0].self_attn.kv_cache.k is not cache


def test_only_batched_decode_steps_are_frozen():
    """Prefill and single-row graphs stay unfrozen: freezing would fold their fp32 weight conversions into copies."""
    from mixtral.backends.cpu import frozen_when_decoding_a_batch

    seen = {}
    call = frozen_when_decoding_a_batch(
        lambda tokens, **kw: seen.setdefault(tuple(tokens.shape), torch._inductor.config.freezing)
    )
    for shape in [(3, 1), (1, 1), (3, 9), (1, 9)]:
        call(torch.zeros(shape, dtype=torch.long), start=4)
    assert seen == {(3, 1): True, (1, 1): False, (3, 9): False, (1, 9): False}
    assert not torch._inductor.config.freezing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_traces_as_one_graph(monkeypatch, dtype):
    """Dropless MoE inference has no graph break: a padded batched prefill and decode steps are one graph each,
    the grouped GEMM one opaque node even where it loops over segments on the host (fp32 compute forced on),
    or, for a single token, no node of its own."""
    from mixtral.kernels import fp32_compute

    monkeypatch.setattr(fp32_compute, "needed", lambda dt: dt == torch.bfloat16)
    torch.manual_seed(0)
    model = Mixtral(small_config(), get_backend("cpu"))
    model.init_weights()
    model = model.to(dtype).eval()
    model.setup_caches(2, 32)
    pad = torch.tensor([0, 3])
    with torch.inference_mode():
        prefill = torch._dynamo.explain(model)(torch.randint(3, 101, (2, 12)), last_only=True, pad=pad)
        decode = torch._dynamo.explain(model)(torch.randint(3, 101, (2, 1)), start=12, pad=pad)
        model.setup_caches(1, 32)
        single = torch._dynamo.explain(model)(torch.randint(3, 101, (1, 1)), start=12)
    for run in (prefill, decode, single):
        assert (run.graph_count, run.graph_break_count) == (1, 0), run.break_reasons
    opaque = "mixtral.packed_grouped_mm"
    assert opaque in str(prefill.graphs[0].graph) and opaque in str(decode.graphs[0].graph)
    assert opaque not in str(single.graphs[0].graph)  # one token's experts: row_products.grouped_mm, fused


def test_cli_interactive(model_dir, reference, capsys, monkeypatch):
    generator, tokenizer = reference
    script = "/set temperature 0.7\n/set top_k 40\n/set top_p 2\n/show\n/help\nWho are you?\n/bogus\n/quit\nignored\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code, out, _ = cli(capsys, "--model", str(model_dir), "--interactive", "--seed", "5", "--max-tokens", "6")
    assert code == 0
    assert "temperature = 0.7" in out and "top_k = 40" in out and "not set: --top-p must be in (0, 1]" in out
    assert "temperature=0.7 top_p=1.0 top_k=40 max_tokens=6 seed=5" in out
    assert "/set max_tokens N" in out and "unknown command /bogus" in out
    prompt = [tokenizer.bos_id] + tokenizer.encode("[INST] Who are you? [/INST]", bos=False)
    reply = generator.generate([prompt], 6, temperature=0.7, top_k=40, seed=5)[0]
    assert ">>> " + tokenizer.decode(reply) + "\n" in out


def test_cli_bad_inputs(model_dir, capsys, tmp_path):
    not_mixtral = tmp_path / "llama"
    not_mixtral.mkdir()
    (not_mixtral / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    bad_shape = tmp_path / "bad_shape"
    bad_shape.mkdir()
    (bad_shape / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(33)
    save_file(tensors, bad_shape / "model.safetensors")
    cases = [
        (["--model", str(tmp_path / "missing"), "--prompt", "hi"], "model directory not found"),
        (["--model", str(not_mixtral), "--prompt", "hi"], "llama"),
        (["--model", str(bad_shape), "--prompt", "hi"], "'model.norm.weight' has shape [33]"),
        (["--model", str(model_dir), "--prompt", "   "], "empty prompt"),
        (
            ["--model", str(model_dir), "--prompt", "hi", "--max-tokens", "47"],
            "prompt of 2 tokens plus 47 new tokens exceeds the model's max_position_embeddings of 48; lower max "
            "tokens to at most 46",
        ),
        (["--model", str(model_dir), "--prompt", "hi", "--backend", "nope"], "unknown backend 'nope'"),
        (["--model", str(model_dir), "--prompt", "hi", "--backend", "cuda"], "backend 'cuda' is not available"),
        (["--model", str(model_dir), "--prompts-file", str(tmp_path / "none.txt")], "prompts file not found"),
        (
            ["--model", str(model_dir), "--prompt", "hi", "--compile", "--tp", "2"],
            "--compile runs a single rank's model; it does not combine with --tp / --ep / --pp yet",
        ),
    ]
    for args, message in cases:
        code, out, err = cli(capsys, *args)
        assert code == 2, args
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, (args, err)
