"""The real-model mini-study: the whole protocol on SmolLM2-135M-Instruct and real chats.

    python -m xft_jax.demo --config=configs/smollm2_study.py   # into xft_smollm2_study/

One axis (naturalness) x the five variants x three seeds, on 1,000 rated items built from
real chitchat conversations (``xft_jax/data/chitchat_degraded.py``; 547 training,
135 validation and 318 test items), under the study protocol of
``xft_jax/config_defaults.py``; the probe runs with the untuned base as reference.

Its training recipe is the demo's (prompts without the rubric, LoRA rank 8, cosine
schedule), lengthened to one that learns the rating: batch 4, 2 epochs (about 270 steps)
at lr 2e-3 with 20 warm-up steps, validation every 30 steps. It was chosen on validation
data only, from label_only's validation curve (bench/README.md: at batch 4, validation
accuracy 0.47 from step 120 and 0.59 at step 240 against a majority-class rate of 0.24;
at batch 8 and the same step count, twice the cost, 0.54; the demo's 27 steps stay at
chance), and holds for every variant. On 2 CPU cores one run takes about 19.5 minutes
(label_only) to 22.5 (explanation), so the 15 runs take about 5.5 hours (a GPU was not
measured). Rows pad to powers of two (``data.bucket_step=0``), as in the committed run;
the demo pads to multiples of 16. Interrupted, the same command resumes at the first
unfinished run. Any change of a setting is a new study, to be run into a new
``--config.out``.
"""

from xft_jax.study.demo_configs import demo_config


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/smollm2_study.py: takes no arg (got {arg!r})")
    c = demo_config("")
    c.out = "xft_smollm2_study"
    c.seeds = (0, 1, 2)
    c.num_items = 1000
    t = c.train
    t.data.batch_size = 4
    t.optim.lr = 2e-3
    t.optim.warmup_steps = 20
    t.train.epochs = 2.0
    t.train.eval_every = 30
    # The committed run padded to powers of two; 16 would be faster here but is a new
    # study (float rounding differs, and over 271 steps so may the runs).
    t.data.bucket_step = 0
    return c
