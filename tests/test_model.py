"""model.py against an independent reference: transformers' own Qwen2/Llama/Qwen3 on the same weights."""
import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from model import (SHAPES, CheckpointError, ModelConfig, Transformer, generate, load_model, load_tokenizer,
                   make_random_checkpoint, make_tiny_checkpoint, random_model, save_model, token_logprobs,
                   chunked_logprobs)

MODEL_TYPES = ["qwen2", "llama", "qwen3"]


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompts_for(tokenizer):
    texts = ["I feel so alone since my sister moved away.", "hi",
             "My manager criticised my report in front of everyone and I have not slept since."]
    return texts, [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_match_transformers(tiny_checkpoints, model_type):
    path = tiny_checkpoints[model_type]
    ours, ref = load_model(path), hf_model(path)
    ids = torch.randint(0, ours.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, ref_logits = ours(ids), ref(ids).logits
    assert ours_logits.shape == ref_logits.shape == (3, 37, ours.config.vocab_size)
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-4, rtol=1e-4)
    # and the logits are not trivially equal to something constant
    assert ours_logits.std() > 0.1


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_generation_matches_transformers_generate(tiny_checkpoints, model_type):
    path = tiny_checkpoints[model_type]
    ours, ref, tokenizer = load_model(path), hf_model(path), load_tokenizer(path)
    texts, prompts = prompts_for(tokenizer)
    new_ids, _ = generate(ours, prompts, 24, [tokenizer.eos_token_id], temperature=0, pad_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    out = ref.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    ref_new = out[:, enc.input_ids.shape[1]:].tolist()
    for ours_row, ref_row in zip(new_ids, ref_new):
        assert ours_row == ref_row[:len(ours_row)]
        assert len(ours_row) == 24 or ours_row[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_kv_cache_decode_equals_full_recompute(tiny_checkpoints, model_type):
    """Sampled tokens' log-probs from the cached decode == teacher-forced log-probs of the full sequence."""
    path = tiny_checkpoints[model_type]
    model, tokenizer = load_model(path), load_tokenizer(path)
    _, prompts = prompts_for(tokenizer)
    g = torch.Generator().manual_seed(3)
    new_ids, new_logprobs = generate(model, prompts, 30, [tokenizer.eos_token_id], temperature=0.7, generator=g)
    for prompt, ids, logprobs in zip(prompts, new_ids, new_logprobs):
        full = torch.tensor([prompt + ids])
        with torch.no_grad():
            recomputed = token_logprobs(model, full, temperature=0.7)[0, len(prompt) - 1:]
        torch.testing.assert_close(torch.tensor(logprobs), recomputed, atol=1e-4, rtol=1e-4)


def test_generation_is_seeded_and_stops_per_row_at_eos(tiny_qwen2):
    model, tokenizer = load_model(tiny_qwen2), load_tokenizer(tiny_qwen2)
    _, prompts = prompts_for(tokenizer)
    run = lambda seed, **kw: generate(model, prompts, 16, [tokenizer.eos_token_id], temperature=1.0,
                                      generator=torch.Generator().manual_seed(seed), **kw)[0]
    assert run(1) == run(1)
    assert run(1) != run(2)
    # Make the third token of row 0 the stop token: row 0 must end right there, including it.
    free_run = run(1)
    stop = free_run[0][2]
    stopped = generate(model, prompts, 16, [stop], temperature=1.0, generator=torch.Generator().manual_seed(1))[0]
    assert stopped[0] == free_run[0][:3]
    for row, free in zip(stopped, free_run):
        n = free.index(stop) + 1 if stop in free else len(free)
        assert row == free[:n]  # every row stops at its own first stop token, or runs to max_new_tokens


def test_tiny_top_p_is_greedy(tiny_qwen2):
    model, tokenizer = load_model(tiny_qwen2), load_tokenizer(tiny_qwen2)
    _, prompts = prompts_for(tokenizer)
    greedy = generate(model, prompts, 12, [tokenizer.eos_token_id], temperature=0)[0]
    nucleus = generate(model, prompts, 12, [tokenizer.eos_token_id], temperature=1.0, top_p=1e-6,
                       generator=torch.Generator().manual_seed(0))[0]
    assert nucleus == greedy


def test_chunked_logprobs_match_full_softmax_and_gradients(tiny_qwen2):
    model = load_model(tiny_qwen2)
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    hidden = model(ids[:, :-1], return_hidden=True).detach().requires_grad_(True)
    logprobs, entropy = chunked_logprobs(model.lm_head, hidden, ids[:, 1:], temperature=0.8, chunk_size=6)
    full = torch.log_softmax(model.lm_head(hidden).float() / 0.8, -1)
    expected = full.gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1))
    g1, = torch.autograd.grad(logprobs.sum(), hidden, retain_graph=True)
    g2, = torch.autograd.grad(expected.sum(), hidden)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_save_load_round_trip_through_transformers(tiny_checkpoints, tmp_path, model_type):
    ours = load_model(tiny_checkpoints[model_type])
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01)  # "trained" weights, so we do not just re-read the original files
    out = str(tmp_path / "saved")
    save_model(ours.state_dict(), ours.config, out, load_tokenizer(tiny_checkpoints[model_type]),
               max_shard_bytes=20_000)  # force several shards + an index
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    ref = hf_model(out)
    ids = torch.randint(0, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
        # ... and back: transformers' own save (new rope_parameters config layout) loads in our code
        hf_out = str(tmp_path / "hf_saved")
        ref.save_pretrained(hf_out)
        torch.testing.assert_close(load_model(hf_out)(ids), ours(ids), atol=1e-4, rtol=1e-4)


def test_tokenizer_has_chat_template_and_think_tokens(tiny_qwen2):
    tokenizer = load_tokenizer(tiny_qwen2)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode("<think>x</think>")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<think>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>"


def test_clear_errors_for_bad_checkpoints(tmp_path, tiny_qwen2):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        load_model(str(empty))
    config = json.load(open(os.path.join(tiny_qwen2, "config.json")))
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(str(empty))
    config["num_hidden_layers"] = 3  # weights only hold 2 layers
    (empty / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(tiny_qwen2, "model.safetensors"), empty / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_model(str(empty))


def test_truncated_or_corrupt_safetensors_are_caught_from_the_header(tmp_path, tiny_qwen2):
    import shutil

    from model import check_weights

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen2, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    assert check_weights(str(folder)) == [str(weights)]  # the intact file passes
    header_len = int.from_bytes(data[:8], "little")
    cases = {"one byte short": (data[:-1], "truncated or corrupt"),  # the header promises one more byte
             "one byte extra": (data + b"\0", "truncated or corrupt"),
             "cut in the header": (data[:8 + header_len // 2], "truncated or not a safetensors"),
             "4 bytes": (data[:4], "truncated or not a safetensors"),
             "header not JSON": (data[:8] + b"{" * header_len + data[8 + header_len:], "corrupt safetensors header")}
    for name, (broken, message) in cases.items():
        weights.write_bytes(broken)
        with pytest.raises(CheckpointError, match=message):
            check_weights(str(folder))
        with pytest.raises(CheckpointError, match=message):  # load_model goes through the same check
            load_model(str(folder))


def test_per_row_generators_make_a_row_independent_of_its_batch(tiny_qwen2):
    """With one generator per row, a dialogue samples the same tokens alone or inside a bigger batch."""
    model, tokenizer = load_model(tiny_qwen2), load_tokenizer(tiny_qwen2)
    _, prompts = prompts_for(tokenizer)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    together = generate(model, prompts, 16, [tokenizer.eos_token_id], generator=gens([7, 8, 9]))[0]
    alone = generate(model, prompts[2:], 16, [tokenizer.eos_token_id], generator=gens([9]))[0]
    assert together[2] == alone[0]
    shared = generate(model, prompts, 16, [tokenizer.eos_token_id], generator=torch.Generator().manual_seed(9))[0]
    assert shared[0] != together[0] or shared[1] != together[1]  # a shared stream couples the rows


def test_compiled_decode_matches_eager(tiny_qwen2):
    """generate(compile=True) attends over a fixed bucket of the static cache (attended_columns) with a mask: same
    tokens and log-probs."""
    model, tokenizer = load_model(tiny_qwen2), load_tokenizer(tiny_qwen2)
    _, prompts = prompts_for(tokenizer)
    eager = generate(model, prompts, 12, [tokenizer.eos_token_id], temperature=0.8,
                     generator=torch.Generator().manual_seed(5))
    fast = generate(model, prompts, 12, [tokenizer.eos_token_id], temperature=0.8,
                    generator=torch.Generator().manual_seed(5), compile=True)
    assert fast[0] == eager[0]
    torch.testing.assert_close(torch.tensor(sum(fast[1], [])), torch.tensor(sum(eager[1], [])), atol=1e-4, rtol=1e-4)


def test_stop_token_ids_read_the_checkpoint_configs(tiny_qwen2, tmp_path):
    import shutil

    from model import stop_token_ids

    tokenizer = load_tokenizer(tiny_qwen2)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert stop_token_ids(tokenizer) == [im_end]  # tokenizer EOS == config.json's eos_token_id
    folder = shutil.copytree(tiny_qwen2, tmp_path / "ckpt")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, endoftext]}))
    assert stop_token_ids(load_tokenizer(str(folder))) == sorted([im_end, endoftext])  # as Qwen2.5-Instruct ships


# ---------------------------------------------------------------------------------------------------------
# Real architectures (model.SHAPES) and mixed precision


# Parameter counts as the model cards and the hub publish them (billions, 2 decimals): our independent reference.
PUBLISHED_BILLIONS = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.62, "llama3-8b": 8.03,
                      "qwen3-8b": 8.19}


def meta_pair(hf):
    """Ours and transformers' model of one config, both on the meta device (no memory, no init work)."""
    with torch.device("meta"):
        return Transformer(ModelConfig.from_hf(hf)), AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes_have_the_published_size_and_transformers_layout(name):
    ours, ref = meta_pair(SHAPES[name])
    n = sum(p.numel() for p in ours.parameters())  # a tied embedding/head counted once, as published
    assert round(n / 1e9, 2) == PUBLISHED_BILLIONS[name]
    if name == "qwen2.5-0.5b":
        assert round(n / 1e6) == 494  # "0.49B", the model card's 494M
    # transformers builds the very same parameter names and shapes from the same config.json
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert n == sum(p.numel() for p in ref.parameters())


def small(name, **changes):
    """A real shape's config with its architecture switches (bias, tying, rope scaling, q/k norm) at toy sizes."""
    return dict(SHAPES[name], num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=2048, **changes)


def test_random_model_is_seeded_tied_and_made_on_the_device_in_its_dtype():
    a = random_model(small("qwen2.5-0.5b"), "cpu", torch.bfloat16, seed=3)
    b = random_model(small("qwen2.5-0.5b"), "cpu", torch.bfloat16, seed=3)
    c = random_model(small("qwen2.5-0.5b"), "cpu", torch.bfloat16, seed=4)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied, as Qwen2.5-0.5B
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16} and a.inv_freq.dtype == torch.float32
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not torch.equal(sa["model.norm.weight"], sc["model.norm.weight"])
    q = a.model.layers[0].self_attn.q_proj
    assert 0.04 < q.weight.float().std() < 0.06 and q.bias.abs().max() > 0  # weights N(0, 0.05^2), biases random
    assert 0.9 < a.model.norm.weight.float().mean() < 1.1
    assert random_model(small("llama3-8b"), "cpu").lm_head.weight is not None
    assert random_model(small("llama3-8b"), "cpu").config.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("name", ["qwen2.5-7b", "llama3-8b", "qwen3-8b"])
def test_random_checkpoint_of_a_real_architecture_loads_in_transformers(tmp_path, name):
    """What rlver.py --model NAME makes (at toy sizes here): the HF layout, our tokenizer's special ids, and
    transformers computes the same logits from it as we do."""
    path = make_random_checkpoint(str(tmp_path / name), small(name), seed=1, dtype=torch.float32)
    config = json.load(open(os.path.join(path, "config.json")))
    tokenizer = load_tokenizer(path)
    assert config["eos_token_id"] == tokenizer.eos_token_id and config["vocab_size"] == 2048 > len(tokenizer)
    assert {k: config[k] for k in ("model_type", "rope_theta", "tie_word_embeddings", "rms_norm_eps")} == \
        {k: SHAPES[name].get(k) for k in ("model_type", "rope_theta", "tie_word_embeddings", "rms_norm_eps")}
    ours = load_model(path)
    ids = torch.randint(0, 2048, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_model(path)(ids).logits, atol=1e-4, rtol=1e-4)


def test_autocast_keeps_fp32_weights_computes_bf16_and_cached_decode_matches_recompute(tiny_qwen2):
    """Plain-module mixed precision (what rlver --no-fsdp uses for bf16): fp32 parameters, bf16 logits; the KV
    cache holds bf16 keys and values, and the sampled tokens' log-probs match a teacher-forced recompute."""
    model, tokenizer = load_model(tiny_qwen2), load_tokenizer(tiny_qwen2)
    model.autocast_dtype = torch.bfloat16
    _, prompts = prompts_for(tokenizer)
    kv_dtypes = []
    hook = model.model.layers[0].self_attn.v_proj.register_forward_hook(lambda m, i, out: kv_dtypes.append(out.dtype))
    new_ids, new_logprobs = generate(model, prompts, 20, [tokenizer.eos_token_id], temperature=0.7,
                                     generator=torch.Generator().manual_seed(3))
    hook.remove()
    assert set(kv_dtypes) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.tensor([prompts[0] + new_ids[0]])
    with torch.no_grad():
        assert model(ids).dtype == torch.bfloat16
        recomputed = token_logprobs(model, ids, temperature=0.7)[0, len(prompts[0]) - 1:]
        model.autocast_dtype = None
        fp32 = token_logprobs(model, ids, temperature=0.7)[0, len(prompts[0]) - 1:]
    assert recomputed.dtype == torch.float32
    torch.testing.assert_close(torch.tensor(new_logprobs[0]), recomputed, atol=0.02, rtol=0.01)  # observed 0.006
    assert 0 < (recomputed - fp32).abs().max() < 0.05  # bf16 rounding shows, but small (observed 0.005)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 2), (28, 4)])  # the tiny models' grouping; Qwen2.5-7B's 7:1
def test_folded_grouped_attention_equals_sdpa_with_enable_gqa(n_heads, n_kv_heads):
    # the query group folded into the sequence axis (what prefill and decode run) against the formula it
    # replaced, SDPA with the mask and enable_gqa=True, in fp32: a decode step (T = 1) and a ragged prefill
    from model import grouped_attention

    g = torch.Generator().manual_seed(0)
    B, S, D = 3, 11, 16
    k, v = torch.randn(B, n_kv_heads, S, D, generator=g), torch.randn(B, n_kv_heads, S, D, generator=g)
    for T in (1, 5):
        q = torch.randn(B, n_heads, T, D, generator=g)
        positions = torch.tensor([[S - T + t for t in range(T)], [2 + t for t in range(T)], [t for t in range(T)]])
        mask = (torch.arange(S) <= positions[:, :, None])[:, None]  # (B, 1, T, S): row 2 sees 1 key at t = 0
        old = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(grouped_attention(q, k, v, mask), old, rtol=0, atol=1e-6)


def test_keyed_sampling_draws_from_p_per_row_stream():
    # stream keys (seed, draw index): a row's token is a function of its key and logits alone, whatever shares
    # its batch; over 20,000 keys the tokens follow softmax(logits / T), and under top-p the renormalised kept set
    from model import keyed_uniform, sample

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -20.0, 0.3])
    keys = torch.stack([torch.full((20000,), 12345678901), torch.arange(20000)], 1)  # one stream, 20,000 draws
    u = keyed_uniform(keys)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    for top_p in (1.0, 0.8):
        p = torch.softmax(logits / 0.7, -1)
        if top_p < 1:  # the smallest set of most likely tokens whose mass reaches top_p
            order = p.argsort(descending=True)
            kept = order[:int((p[order].cumsum(0) < top_p).sum()) + 1]
            p = torch.zeros_like(p).index_copy(0, kept, p[kept]) / p[kept].sum()
        tokens, logprobs = sample(logits.expand(20000, -1), 0.7, top_p, keys)
        freq = torch.bincount(tokens, minlength=8).double() / 20000
        sigma = (p * (1 - p) / 20000).sqrt().double()
        assert ((freq - p.double()).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
        torch.testing.assert_close(logprobs, torch.log_softmax(logits / 0.7, -1)[tokens])
    alone, _ = sample(logits[None], 0.7, 1.0, keys[7:8])
    assert alone.item() == sample(logits.expand(20000, -1), 0.7, 1.0, keys)[0][7].item()
