"""A short causal-LM pre-training of a tiny base model, for the offline demo.

LoRA on a random network would teach nothing, so the demo first trains every weight of a
small decoder (on the real Mistral tokenizer) on unlabelled dialogues. The result is saved
as an ordinary HF safetensors checkpoint and reused while its recipe is unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from xft_jax import atomic
from xft_jax.models import config as model_config
from xft_jax.models import decoder, hf_io


@dataclasses.dataclass(frozen=True)
class PretrainRecipe:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0
    num_texts: int = 2000

    def identity(self, vocab_size: int, data_tag: str) -> dict:
        """Everything the base model depends on (the recipe, vocabulary and corpus)."""
        return {**dataclasses.asdict(self), "vocab": vocab_size, "data": data_tag}

    def key(self, vocab_size: int, data_tag: str) -> str:
        blob = json.dumps(self.identity(vocab_size, data_tag), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_config_for(recipe: PretrainRecipe, tokenizer) -> model_config.ModelConfig:
    return model_config.ModelConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_layers=recipe.num_layers,
        num_heads=recipe.num_heads, num_kv_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads, rms_norm_eps=1e-5,
        max_position_embeddings=4096, tie_word_embeddings=True, model_type="mistral",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def token_windows(texts, tokenizer, seq_len: int) -> np.ndarray:
    """All texts joined by EOS, cut into [N, seq_len + 1] windows."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=True)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"pre-training corpus has {len(ids)} tokens, fewer than seq_len={seq_len}")
    arr = np.asarray(ids[: n * seq_len + 1], np.int32)
    return np.stack([arr[i * seq_len: (i + 1) * seq_len + 1] for i in range(n)])


def pretrain(texts, tokenizer, recipe: PretrainRecipe, out_dir: str, *,
             data_tag: str = "", log=print) -> str:
    """Trains (or reuses) a base model; returns the checkpoint directory."""
    key = recipe.key(len(tokenizer), data_tag)
    done = os.path.join(out_dir, "pretrain.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            if json.load(f).get("key") == key:
                log(f"[pretrain] reusing cached base model {out_dir} (recipe {key})")
                return out_dir
    cfg = model_config_for(recipe, tokenizer)
    windows = token_windows(texts, tokenizer, recipe.seq_len)
    model = decoder.Decoder(cfg, rngs=nnx.Rngs(recipe.seed))
    params = model.params()
    warmup = min(recipe.warmup_steps, recipe.steps - 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, recipe.learning_rate, warmup,
                                               recipe.steps, recipe.learning_rate * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = tx.init(params)

    # The corpus uses a small slice of the 32k vocabulary: the softmax runs over the ids
    # that occur (the embedding is tied, so those rows are also the LM head's).
    vocab_ids = np.unique(windows)
    remap = np.zeros(cfg.vocab_size, np.int32)
    remap[vocab_ids] = np.arange(len(vocab_ids), dtype=np.int32)
    windows = remap[windows]
    vocab_ids = jnp.asarray(vocab_ids)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            ids = vocab_ids[batch[:, :-1]]
            h = decoder.forward(p, cfg, decoder.TokenInputs(ids),
                                decoder.OutputRequest("hidden"))["hidden"]
            logits = jnp.einsum("btd,vd->btv", h, p["embed"][vocab_ids])
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
            nll = -jnp.take_along_axis(logp, batch[:, 1:, None], -1)[..., 0]
            return nll.mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(recipe.seed)
    bar = tqdm(range(recipe.steps), desc="pre-train base", unit="step")
    t0 = time.time()
    losses = []
    for _ in bar:
        batch = windows[rng.integers(0, len(windows), recipe.batch_size)]
        params, opt_state, loss = step(params, opt_state, jnp.asarray(batch))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)) or ".",
                           prefix=".pretrain_")
    hf_io.save_pretrained(model, tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "pretrain.json"), "w", encoding="utf-8") as f:
        json.dump({"key": key, "recipe": dataclasses.asdict(recipe), "data": data_tag,
                   "softmax_vocab": int(len(vocab_ids)),
                   "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])),
                   "seconds": time.time() - t0, "windows": int(len(windows))}, f, indent=2)
    atomic.replace_dir(tmp, out_dir)
    log(f"[pretrain] loss {losses[0]:.2f} -> {np.mean(losses[-10:]):.2f} in "
        f"{time.time() - t0:.0f}s; saved {out_dir}")
    return out_dir
