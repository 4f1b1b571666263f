"""rollout.py, the multi-turn engine, in-process on the tiny checkpoint against the rules simulator: the carried
ids of a dialogue are exactly the chat template of its conversation with the policy turns as sampled, the loss
mask covers exactly the sampled tokens, in both template modes and whichever stop token ended a turn; and the
engine's independent reference: the logits of every prefill and decode step equal a plain forward of the same ids
(check_engine_logits), across batch sizes, simulator latencies, ablations, strip's roll-backs and the compiled step."""
import torch

import model as lm
import rollout as ro
import simulator as sim


# ---------------------------------------------------------------------------------------------------------
# The multi-turn token carry


def runs(mask):
    """Maximal runs of equal mask values: [(value, start, end)]."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


def eos_bias_hook(model, eos_id, bias, record=None):
    """Make the random tiny model end some (not all) turns with EOS: add `bias` to the EOS logit. record (a
    list): every forward's logits also land there as rows (n, V), the engine's own logits for the test to
    check against a recompute (rows of idle slots that ride along in a decode step included)."""
    # kept outside any compiled graph: traced, the growing list would recompile the decode step every call
    keep = None if record is None else torch.compiler.disable(record.append)

    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos_id] += bias
        if keep is not None:
            keep(logits.detach().reshape(-1, logits.shape[-1]).float().clone())
        return logits
    return model.lm_head.register_forward_hook(hook)


def dialogues_for_carry(tiny_qwen2, think, eos_ids=None, bias_id=None):
    tok = lm.load_tokenizer(tiny_qwen2)
    model = lm.load_model(tiny_qwen2)
    # +5 on the EOS logit: about 60% of 24 turns end with EOS (some at once, an empty reply), the rest run
    # to max_new_tokens; both branches of the carry get exercised
    handle = eos_bias_hook(model, tok.eos_token_id if bias_id is None else bias_id, 5.0)
    try:
        dialogues = ro.rollout(model, tok, sim.builtin_profiles("train")[:8], sim.RulesBackend(), think=think,
                               max_turns=3, max_new_tokens=12, seeds=list(range(8)), eos_ids=eos_ids)
    finally:
        handle.remove()
    return tok, dialogues


def decode(tok, ids, skip=False):
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


EOS = 2  # <|im_end|> in the tiny tokenizer (checked below)


def check_carry(tok, d, think, stop_ids):
    """The ids of one dialogue are the chat template of its conversation, with the policy turns exactly as
    sampled; the mask is True on exactly those sampled tokens."""
    eos = tok.eos_token
    assert tok.eos_token_id == EOS and eos == "<|im_end|>"
    rs = runs(d.policy_mask)
    n = len(d.episode.turns)
    policy_runs = [(s, e) for v, s, e in rs if v]
    context_runs = [(s, e) for v, s, e in rs if not v]
    # prompt, policy turn, user turn, policy turn, ..., policy turn (the simulator's last answer ended it)
    assert [v for v, _, _ in rs] == [False, True] * n
    assert len(policy_runs) == len(d.policy_texts) == n
    sampled = [d.ids[s:e] for s, e in policy_runs]
    # the masked ids are exactly the sampled replies: their decode is the recorded per-turn text
    assert [decode(tok, x, skip=True) for x in sampled] == d.policy_texts
    assert decode(tok, [i for i, m in zip(d.ids, d.policy_mask) if m], skip=True) == "".join(d.policy_texts)
    # a reply only ends early with a stop token; otherwise it used its whole token budget
    ended = [bool(x) and x[-1] in stop_ids for x in sampled]
    assert all(e or len(x) == 12 for e, x in zip(ended, sampled))
    assert all(i not in stop_ids for x in sampled for i in x[:-1])

    # the conversation as the chat template renders it, the assistant turns being the raw sampled text
    # (what the USER saw is its stripped / visible part: episode.messages)
    raw = [decode(tok, x[:-1] if e and decode(tok, x[-1:]) == eos else x) for x, e in zip(sampled, ended)]
    messages = [{"role": "system", "content": ro.system_prompt(think)}] + [dict(m) for m in d.episode.messages]
    assistant = [m for m in messages if m["role"] == "assistant"]
    assert len(assistant) == n and len(messages) == 2 + 2 * n  # system, opening, n x (reply, user answer)
    for m, text in zip(assistant, d.policy_texts):
        assert m["content"] == (sim.visible_reply(text) if think else text.strip())
    marks = [f"\u2063SAMPLED{i}\u2063" for i in range(n)]
    for m, mark in zip(assistant, marks):
        m["content"] = mark
    # the last user answer ended the dialogue: the policy never saw it
    template = ro.render(tok, messages[:-2], add_generation_prompt=True) + marks[-1]
    pieces = []
    for mark in marks:
        before, template = template.split(mark)
        pieces.append(before)
    assert template == ""
    # piece i is the template text before sampled turn i; a turn that ended with the template's own EOS
    # already holds the "<|im_end|>" that starts the next piece, so the carried ids skip it
    for i, (s, e) in enumerate(context_runs):
        want = pieces[i]
        if i and ended[i - 1] and decode(tok, sampled[i - 1][-1:]) == eos:
            assert want.startswith(eos)
            want = want[len(eos):]
        assert decode(tok, d.ids[s:e]) == want, f"context run {i}"
    # and the whole sequence: the template of [system] + the dialogue, with the sampled text as the replies
    rendered = [dict(m) for m in messages[:-2]]
    for m, text in zip([m for m in rendered if m["role"] == "assistant"], raw):
        m["content"] = text
    last = decode(tok, sampled[-1])
    assert decode(tok, d.ids) == ro.render(tok, rendered, add_generation_prompt=True) + last
    return [x[-1] if e else None for x, e in zip(sampled[:-1], ended)]  # how each turn before a user turn ended


def kinds(endings):
    return {"eos" if e == EOS else "other stop" if e is not None else "budget" for e in endings}


def test_rollout_carries_template_ids_and_masks_only_sampled_tokens(tiny_qwen2, one_thread):
    tok, dialogues = dialogues_for_carry(tiny_qwen2, think=False)
    endings = [e for d in dialogues for e in check_carry(tok, d, think=False, stop_ids={tok.eos_token_id})]
    # both branches of the carry, each followed by a user turn: a reply that ended with EOS, one that ran out
    assert kinds(endings) == {"eos", "budget"}
    # collate aligns the loss mask with the targets ids[:, 1:]
    ids, mask = ro.collate(dialogues, tok.pad_token_id, "cpu")
    for i, d in enumerate(dialogues):
        assert mask[i, :len(d.ids) - 1].tolist() == d.policy_mask[1:] and not mask[i, len(d.ids) - 1:].any()
        assert ids[i, :len(d.ids)].tolist() == d.ids


def test_rollout_carry_in_think_mode(tiny_qwen2, one_thread):
    # think-then-say: the user sees only the text after </think>, the ids keep everything the policy sampled
    tok, dialogues = dialogues_for_carry(tiny_qwen2, think=True)
    for d in dialogues:
        rs = runs(d.policy_mask)
        assert [v for v, _, _ in rs] == [False, True] * len(d.episode.turns)
        assert [decode(tok, d.ids[s:e], skip=True) for v, s, e in rs if v] == d.policy_texts
        first = ro.render(tok, [{"role": "system", "content": ro.system_prompt(True)},
                                   d.episode.messages[0]], add_generation_prompt=True)
        assert decode(tok, d.ids[:rs[0][2]]) == first


def test_rollout_carry_when_a_turn_stops_on_another_stop_id(tiny_qwen2, one_thread):
    # Qwen2.5-Instruct stops on <|im_end|> (the tokenizer's EOS, the template's end of turn) and on
    # <|endoftext|> (generation_config.json). A turn that ends with <|endoftext|> still needs the template's
    # "<|im_end|>" after it; only a turn that ended with the template's own EOS may skip it.
    tok = lm.load_tokenizer(tiny_qwen2)
    stop = [tok.eos_token_id, tok.pad_token_id]  # pad = <|endoftext|> in the tiny tokenizer
    assert tok.convert_ids_to_tokens(tok.pad_token_id) == "<|endoftext|>"
    tok, dialogues = dialogues_for_carry(tiny_qwen2, think=False, eos_ids=stop, bias_id=tok.pad_token_id)
    endings = [e for d in dialogues for e in check_carry(tok, d, think=False, stop_ids=set(stop))]
    assert "other stop" in kinds(endings)


# ---------------------------------------------------------------------------------------------------------
# The engine: KV reuse, continuous batching, ablations, think-history strip, compile


def play(tiny_qwen2, profiles, seeds, backend, bias=3.0, record=None, **kw):
    tok = lm.load_tokenizer(tiny_qwen2)
    model = lm.load_model(tiny_qwen2)
    if kw.get("compile"):  # the compiled decode step runs on the model's twin (model.compiled_decode): hook it too
        with lm.compiled_decode(model):
            pass
    handles = [eos_bias_hook(m, tok.eos_token_id, bias, record)  # turns of many different lengths
               for m in [model] + ([lm._TWINS[model][0]] if kw.get("compile") else [])]
    timing = {}
    try:
        dialogues = ro.rollout(model, tok, profiles, backend, think=kw.pop("think", False), max_turns=3,
                               max_new_tokens=12, seeds=seeds, timing=timing, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return tok, dialogues, timing


def record(d):
    return d.ids, d.policy_mask, d.episode.emotion, d.episode.end_reason, d.policy_texts


def check_engine_logits(tiny_qwen2, dialogues, engine_logits, biases, temperature=1.0):
    """
    The engine's independent reference. Every token the engine sampled was drawn from logits that a prefill
    or a decode step computed over its slot of the shared cache (with whatever other slots shared the
    batch, after strip's roll-backs); they must equal a plain forward of the same ids, no cache, no mask, no
    slots (fp32, atol 1e-5). And the log-prob the trainer scores (token_logprobs at the sampling
    temperature) is log_softmax(those logits / temperature) of the sampled token. engine_logits: the rows
    eos_bias_hook recorded during the rollout; biases: {token id: logit bias} the rollout's hooks added.
    Returns the number of sampled tokens checked.
    """
    model = lm.load_model(tiny_qwen2)
    handles = [eos_bias_hook(model, i, b) for i, b in biases.items()]
    engine = torch.cat(engine_logits)  # (R, V): every row of every forward of the rollout
    checked = 0
    try:
        with torch.no_grad():
            for s in ro.training_samples(dialogues):  # keep: a whole dialogue; strip: one turn in its context
                ids = torch.tensor([s.ids])  # (1, T)
                sampled = torch.tensor(s.policy_mask[1:])  # (T-1,): target t + 1 was sampled
                want = model(ids[:, :-1])[0][sampled]  # (n, V) plain causal forward, row t predicts ids[t + 1]
                got = engine[torch.cdist(want, engine).argmin(1)]  # (n, V) the engine's row for each of them
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
                scored = lm.token_logprobs(model, ids, temperature)[0][sampled]  # (n,)
                drawn_from = torch.log_softmax(got / temperature, -1).gather(1, ids[0, 1:][sampled][:, None])
                torch.testing.assert_close(scored, drawn_from[:, 0], atol=1e-5, rtol=0)
                checked += len(want)
    finally:
        for h in handles:
            h.remove()
    return checked


def test_dialogues_do_not_depend_on_batch_latency_or_ablation(tiny_qwen2, one_thread, simulator_server):
    # the same 6 dialogues (same seeds): all at once with the in-process rules simulator; in batches of 2 and
    # alone through a real HTTP simulator whose answers come back after uneven delays (so slots rejoin the
    # decode batch in another order); and with each ablation (re-prefill every turn, lockstep turns)
    # The comparison below shares every line of the engine between its sides (a mask that lets a query see
    # one position ahead would be in all of them); the independent reference is check_engine_logits: the
    # logits of every step of every run against a plain forward of the same ids.
    profiles, seeds = sim.builtin_profiles("train")[:6], [ro.rollout_seed(0, 3, j) for j in range(6)]
    logits = {name: [] for name in ("ref", "split", "alone", "no_reuse", "lockstep")}
    _, ref, timing = play(tiny_qwen2, profiles, seeds, sim.RulesBackend(), record=logits["ref"])
    simulator_server.slow_s = 0.05
    simulator_server.plan = ["slow", "ok", "ok", "slow", "ok"] * 10
    http = sim.OpenAIBackend(simulator_server.url, api_key_env="RLVER_TEST_KEY")
    split = [d for lo in range(0, 6, 2) for d in play(tiny_qwen2, profiles[lo:lo + 2], seeds[lo:lo + 2], http,
                                                       record=logits["split"])[1]]
    alone = [play(tiny_qwen2, [p], [s], sim.RulesBackend(), record=logits["alone"])[1][0]
             for p, s in zip(profiles, seeds)]
    _, no_reuse, timing_no_reuse = play(tiny_qwen2, profiles, seeds, sim.RulesBackend(), kv_reuse=False,
                                        record=logits["no_reuse"])
    _, lockstep, _ = play(tiny_qwen2, profiles, seeds, http, overlap=False, record=logits["lockstep"])
    for other in (split, alone, no_reuse, lockstep):
        assert [record(d) for d in other] == [record(d) for d in ref]
    eos = lm.load_tokenizer(tiny_qwen2).eos_token_id
    for name, dialogues in dict(ref=ref, split=split, alone=alone, no_reuse=no_reuse, lockstep=lockstep).items():
        assert check_engine_logits(tiny_qwen2, dialogues, logits[name], {eos: 3.0}) == timing["tokens"], name
    assert len({len(d.episode.turns) for d in ref}) > 1 or len({len(x) for d in ref for x in d.policy_texts}) > 1
    # KV reuse feeds each token once: a decode step feeds every sampled token but a turn's last, which the
    # next turn's prefill feeds with the user's answer; only each dialogue's very last token is never fed
    conversation = sum(len(d.ids) for d in ref)
    assert timing["conversation_tokens"] == conversation and not any(d.truncated for d in ref)
    assert timing["active_rows"] + sum(len(d.policy_texts) for d in ref) == timing["tokens"]
    assert timing["prefill_tokens"] + timing["active_rows"] + len(ref) == conversation
    assert timing_no_reuse["prefill_tokens"] > 1.5 * timing["prefill_tokens"]
    assert timing["tokens"] == sum(sum(d.policy_mask) for d in ref)


def test_think_history_strip_samples_per_turn(tiny_qwen2, one_thread):
    # strip: each turn is its own sample (its context + its sampled ids); the context of turn k+1 is the
    # context of turn k, the VISIBLE ids of turn k (after the last </think>) and the user's answer
    tok = lm.load_tokenizer(tiny_qwen2)
    think_end = tok.convert_tokens_to_ids("</think>")
    profiles, seeds = sim.builtin_profiles("train")[:4], list(range(4))
    model = lm.load_model(tiny_qwen2)
    engine_logits, timing = [], {}  # (of the strip rollout)
    handles = [eos_bias_hook(model, tok.eos_token_id, 3.0), eos_bias_hook(model, think_end, 4.0, engine_logits)]
    try:  # (at temperature 0.7: the trainer's log-probs must divide by it as the sampler did)
        keep = ro.rollout(model, tok, profiles, sim.RulesBackend(), think=True, max_turns=3, max_new_tokens=12,
                          seeds=seeds, temperature=0.7)
        engine_logits.clear()
        strip = ro.rollout(model, tok, profiles, sim.RulesBackend(), think=True, think_history="strip",
                           max_turns=3, max_new_tokens=12, seeds=seeds, temperature=0.7, timing=timing)
    finally:
        for h in handles:
            h.remove()
    # the engine's independent reference: each turn's logits, from a cache rolled back past the thoughts,
    # equal a plain forward of that turn's sample
    biases = {tok.eos_token_id: 3.0, think_end: 4.0}
    assert check_engine_logits(tiny_qwen2, strip, engine_logits, biases, temperature=0.7) == timing["tokens"]
    assert [len(d.samples) for d in keep] == [1] * 4 and all(d.samples[0].ids is d.ids for d in keep)
    assert [s.dialogue for s in ro.training_samples(strip)] == [i for i, d in enumerate(strip)
                                                                 for _ in d.policy_texts]
    stripped_some = False
    for d in strip:
        assert len(d.samples) == len(d.policy_texts) == len(d.episode.turns)
        prompt = d.ids[:d.policy_mask.index(True)]
        replies = [d.ids[s:e] for v, s, e in runs(d.policy_mask) if v]
        answers = [d.ids[s:e] for v, s, e in runs(d.policy_mask) if not v][1:]  # template ids after each turn
        context = list(prompt)
        for k, sample in enumerate(d.samples):
            n = len(context)
            assert sample.ids == context + replies[k]
            assert sample.policy_mask == [False] * n + [True] * len(replies[k])
            if k + 1 < len(d.samples):
                r = replies[k]
                cut = len(r) - r[::-1].index(think_end) if think_end in r else 0
                stripped_some |= cut > 0
                context = context + r[cut:] + answers[k]
    assert stripped_some  # some turn closed its thought, and its thought left the context
    # strip changes what later turns see, never the first turn
    assert [s.samples[0].ids for s in strip] == [k.ids[:len(s.samples[0].ids)] for s, k in zip(strip, keep)]


def test_compiled_decode_gives_the_same_tokens(tiny_qwen2, one_thread):
    profiles, seeds = sim.builtin_profiles("train")[:3], [5, 6, 7]
    _, eager, _ = play(tiny_qwen2, profiles, seeds, sim.RulesBackend())
    engine_logits = []
    _, compiled, timing = play(tiny_qwen2, profiles, seeds, sim.RulesBackend(), compile=True, record=engine_logits)
    assert [record(d) for d in compiled] == [record(d) for d in eager]
    # not only eager's twin: the compiled step's logits (all S + 1 columns attended) against a plain forward
    eos = lm.load_tokenizer(tiny_qwen2).eos_token_id
    assert check_engine_logits(tiny_qwen2, compiled, engine_logits, {eos: 3.0}) == timing["tokens"]


def test_enable_thinking_follows_think(tiny_qwen2):
    # a hybrid template (Qwen3 style) opens an empty thought when enable_thinking is False; --no-think must
    # reach it, in the prompt and in every later turn's generation prompt
    tok = lm.load_tokenizer(tiny_qwen2)
    tok.chat_template = lm.CHATML_TEMPLATE.replace(
        "'<|im_start|>assistant\n' }}", "'<|im_start|>assistant\n' }}{% if enable_thinking is defined and "
        "enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}")
    profile = sim.builtin_profiles("train")[0]
    empty_thought = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for think in (True, False):
        d = ro.start_dialogue(profile, tok, think, 0, "cpu")
        assert decode(tok, d.ids).endswith(empty_thought) == (not think)
        assert decode(tok, ro.user_turn_ids(tok, "hi", think=think)).endswith(empty_thought) == (not think)


def qwen_style_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer split, so '>' merges with the newlines after it (Qwen2.5:
    "</think>\\n\\n" is [522, 26865, 1339]) and no token is "</think>" itself."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    split = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=lm.SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["<think>plan a kind reply</think>\n\nI hear you."], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=lm.CHATML_TEMPLATE)


def test_strip_finds_think_end_in_the_text_when_bpe_merges_it(tiny_qwen2, one_thread):
    # every turn the policy writes "<think>plan a kind reply</think>\n\nI hear you." (forced: the logits) with
    # a tokenizer whose '>' merges with "\n\n": later contexts keep no earlier thought, only the reply
    tok = qwen_style_tokenizer()
    reply = tok.encode("<think>plan a kind reply</think>\n\nI hear you.", add_special_tokens=False)
    assert tok.decode(reply[:-4]).endswith("</think>\n\n")   # the tag ends inside the token '>\n\n'
    assert not any(reply[s:s + 3] == tok.encode("</think>", add_special_tokens=False) for s in range(len(reply)))
    model = lm.load_model(tiny_qwen2)
    script = reply + [tok.eos_token_id]
    forced = {"n": 0}

    def force(module, inputs, logits):  # one dialogue: each forward samples the script's next token
        logits = torch.full_like(logits, -1e4)
        logits[..., script[forced["n"] % len(script)]] = 0.0
        forced["n"] += 1
        return logits
    handle = model.lm_head.register_forward_hook(force)
    try:
        d = ro.rollout(model, tok, sim.builtin_profiles("train")[:1], sim.RulesBackend(), think=True,
                       think_history="strip", max_turns=3, max_new_tokens=len(script), seeds=[0])[0]
    finally:
        handle.remove()
    assert len(d.samples) == 3 and d.policy_texts == [tok.decode(reply)] * 3
    for k, sample in enumerate(d.samples):
        context = tok.decode(sample.ids[:sample.policy_mask.index(True)])
        assert context.count("I hear you.") == k and "plan a kind" not in context   # no earlier thought kept
    assert ro.visible_ids(reply, tok) == reply[-4:] and tok.decode(reply[-4:]) == "I hear you."


def test_replies_cut_at_the_cap_are_counted(tiny_qwen2, one_thread):
    tok, dialogues, _ = play(tiny_qwen2, sim.builtin_profiles("train")[:6], list(range(6)), sim.RulesBackend(), bias=5.0)
    eos = set(lm.stop_token_ids(tok))
    cut = [sum(e - s == 12 and d.ids[e - 1] not in eos for v, s, e in runs(d.policy_mask) if v) for d in dialogues]
    assert [d.episode.truncated_replies for d in dialogues] == cut and 0 < sum(cut) < sum(len(d.policy_texts)
                                                                                             for d in dialogues)


def test_rollout_builds_no_autograd_history(tiny_qwen2, one_thread):
    # the policy's parameters require grad (a trainable policy): no tensor the rollout makes (its logits, its
    # KV cache, which every attention layer is handed) may carry autograd history
    tok, model = lm.load_tokenizer(tiny_qwen2), lm.load_model(tiny_qwen2)
    assert all(p.requires_grad for p in model.parameters())
    seen = []  # (logits, cache) of every forward of the rollout
    handle = model.model.layers[-1].self_attn.register_forward_hook(
        lambda module, args, out: seen.append((out, args[4])))  # Attention.forward(x, cos, sin, mask, cache)
    try:
        dialogues = ro.rollout(model, tok, sim.builtin_profiles("train")[:2], sim.RulesBackend(), think=False,
                               max_turns=2, max_new_tokens=6, seeds=[0, 1])
    finally:
        handle.remove()
    cache = seen[-1][1]
    tensors = [out for out, _ in seen] + cache.k + cache.v
    assert len(seen) > 4 and all(c is cache for _, c in seen)
    assert not any(t.requires_grad or t.grad_fn is not None for t in tensors)
    assert all(isinstance(i, int) for d in dialogues for i in d.ids)


def test_compiled_decode_compiles_once_per_dialogue_count_and_bucket(tiny_qwen2, one_thread):
    # dynamo's own counters over 3 rollouts: no graph break; a compile per (dialogue count, attended bucket)
    # and none for a new rollout's cache or re-pointed weights. max_context 399: buckets of 50, 100, 200 and
    # 400 columns, and these contexts (~200-240 tokens) cross from the 200 bucket into the 400 one
    from torch._dynamo.utils import counters

    tok, model = lm.load_tokenizer(tiny_qwen2), lm.load_model(tiny_qwen2)
    profiles = sim.builtin_profiles("train")
    counters.clear()
    compiles, buckets = [], []
    for n, seeds in ((4, [0, 1, 2, 3]), (4, [0, 1, 2, 3]), (2, [5, 6])):
        kw = dict(think=False, max_turns=2, max_new_tokens=16, seeds=seeds, max_context=399)
        ds = ro.rollout(model, tok, profiles[:n], sim.RulesBackend(), compile=True, **kw)
        compiles.append(counters["stats"]["unique_graphs"])
        prompts = [d.policy_mask.index(True) for d in ds]  # each dialogue's decode attends prompt + 1 .. len(ids)
        buckets.append({lm.attended_columns(m, 400) for d, p in zip(ds, prompts) for m in (p + 1, len(d.ids))})
    assert sum(counters["graph_break"].values()) == 0
    assert buckets[0] == buckets[1] == {200, 400} and buckets[2] == {200, 400}
    assert compiles == [2, 2, 4]  # the second rollout (new cache, same shapes) compiles nothing
    eager = ro.rollout(model, tok, profiles[:2], sim.RulesBackend(), **kw)
    assert [record(d) for d in ds] == [record(d) for d in eager]  # the bucketed step samples the same tokens


def test_engine_phases_alone_prefill_then_decode(tiny_qwen2, one_thread):
    # the engine's phases driven one at a time: prefill_ready feeds each slot its prompt, sample_and_decode
    # samples a token per slot and feeds it; the logits after each phase equal a plain forward of the same ids
    tok, model = lm.load_tokenizer(tiny_qwen2), lm.load_model(tiny_qwen2)
    dialogues = [ro.start_dialogue(p, tok, False, s, "cpu") for p, s in zip(sim.builtin_profiles("train")[:3], [1, 2])]
    cfg = ro.EngineConfig(think=False, max_new_tokens=4)
    engine = ro.Engine(model, tok, sim.RulesBackend(), dialogues, cfg, {key: 0 for key in ro.TIMING})
    assert engine.ready == [0, 1] and [d.turn_start for d in dialogues] == [len(d.ids) for d in dialogues]
    with torch.no_grad():
        engine.prefill_ready()
        assert engine.generating == [0, 1] and [d.length for d in dialogues] == [len(d.ids) for d in dialogues]
        want = torch.cat([model(torch.tensor([d.ids]))[:, -1] for d in dialogues])   # (2, V), no cache, no mask
        torch.testing.assert_close(engine.logits, want, atol=1e-5, rtol=0)
        engine.sample_and_decode()
        assert [len(d.reply) for d in dialogues] == [1, 1] and engine.timing["decode_steps"] == 1
        going = [dialogues[i] for i in engine.generating]   # (a slot that sampled EOS left the batch: held)
        assert [d.length for d in going] == [len(d.ids) for d in going] and len(going) + len(engine.held) == 2
        want = torch.cat([model(torch.tensor([d.ids]))[:, -1] for d in going])
        torch.testing.assert_close(engine.logits, want, atol=1e-5, rtol=0)
